"""The replay that scores a prompt by reconstruction (KVzip), run by the cache right after the prompt.

For every sequence the real prompt (left padding dropped) is split into a chat-template header, kept whole,
and the context after it, cut into chunks of ``chunk_size`` tokens. Round ``r`` feeds every sequence, on
top of its cached prompt::

    "\\n\\nRepeat the previous context exactly."  + <end of user turn, start of assistant turn> + chunk 0
    "\\n\\nRepeat the part of ..., starting with" + <last 8 tokens of chunk r-1> + <...> + chunk r

at the positions after the prompt. Every layer attends exactly (the replay's hidden states are the model's
own), scores the chunk's rows (:class:`~kvsqueeze.scorers.reconstruction.ReconstructionScorer`), then drops
the replay's rows, so the cache holds the prompt alone again. A sequence with fewer chunks replays the bare
instruction in the rounds it lacks and scores nothing there, so a batch scores exactly as its sequences
would one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from kvsqueeze.scorers.reconstruction import CONTINUE_PROMPT, REPEAT_PROMPT, ReconstructionScorer, ReplaySpan

if TYPE_CHECKING:
    from kvsqueeze.cache.cache import SqueezeCache


@dataclass(frozen=True)
class ReplayText:
    """The token ids a replay is built from, for one tokenizer."""

    repeat: list[int]  # the instruction of the first round
    resume: list[int]  # the instruction of later rounds (followed by the previous chunk's last tokens)
    turn: list[int]  # what closes the user turn and opens the assistant's ("\n" without a chat template)
    header: list[int]  # the chat template's opening up to the user's text (kept whole, not replayed)

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> ReplayText:
        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        header, turn = "", "\n"
        if getattr(tokenizer, "chat_template", None):
            marker = "\x00kvsqueeze-context\x00"
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
            )
            header, turn = text.split(marker)
        return cls(encode(REPEAT_PROMPT), encode(CONTINUE_PROMPT), encode(turn), encode(header))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class _Sequence:
    """One sequence's prompt as the replay sees it."""

    ids: list[int]  # real prompt tokens
    first: int  # absolute position of the first of them
    header: int  # tokens of the chat-template header at its start (kept whole)


def _rounds(
    sequences: list[_Sequence], text: ReplayText, scorer: ReconstructionScorer
) -> list[list[tuple[list[int], int, int]]]:
    """Per round, per sequence: (input ids, first, end position of the chunk it repeats)."""
    size = scorer.chunk_size
    chunks = [[s.ids[i : i + size] for i in range(s.header, len(s.ids), size)] for s in sequences]
    rounds = []
    for r in range(max((len(c) for c in chunks), default=0)):
        this = []
        for seq, own in zip(sequences, chunks, strict=True):
            if r >= len(own):
                this.append((text.repeat + text.turn, 0, 0))
                continue
            lead = text.repeat if r == 0 else text.resume + own[r - 1][-scorer.overlap :]
            start = seq.first + seq.header + r * size
            this.append((lead + text.turn + own[r], start, start + len(own[r])))
        rounds.append(this)
    return rounds


@torch.inference_mode()
def replay_and_score(
    cache: SqueezeCache, decoder: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[torch.Tensor], float]:
    """Replay ``cache``'s prompt through ``decoder`` and score its rows; the cache is left as it was.

    Returns the scores of every layer's stored rows, (B, H_kv, T) fp32 (the header's rows +inf if the
    scorer keeps it), and the seconds the replay took.
    """
    start_time = time.perf_counter()
    scorer = cache.layers[0].components.scorer
    if cache.prompt_ids is None:
        raise ValueError("kvzip replays the prompt's tokens: run the prompt as input_ids, not inputs_embeds")
    text = ReplayText.for_tokenizer(tokenizer)
    mask = cache.prompt_mask.bool()
    first_layer = cache.layers[0]
    first_positions = (
        first_layer.rows.padded("positions", fill=2**30).view(first_layer.batch_size, -1).amin(-1)
    )
    sequences = []
    for b in range(mask.shape[0]):
        ids = cache.prompt_ids[b][mask[b]].tolist()
        sequences.append(_Sequence(ids, int(first_positions[b]), _common_prefix(text.header, ids)))
    prompt_end = torch.tensor([s.first + len(s.ids) for s in sequences])
    sink_end = torch.tensor([s.first + scorer.sinks for s in sequences])
    device = first_layer.device
    for layer in cache.layers:
        layer.begin_replay()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for this in _rounds(sequences, text, scorer):
            width = max(len(ids) for ids, _, _ in this)
            input_ids = torch.full((len(this), width), pad, dtype=torch.long)
            round_mask = torch.zeros(len(this), width, dtype=torch.long)
            positions = torch.zeros(len(this), width, dtype=torch.long)
            for b, (ids, _, _) in enumerate(this):
                input_ids[b, width - len(ids) :] = torch.tensor(ids)
                round_mask[b, width - len(ids) :] = 1
                positions[b, width - len(ids) :] = prompt_end[b] + torch.arange(len(ids))
            cache.group.replay_span = ReplaySpan(
                start=torch.tensor([s for _, s, _ in this], device=device),
                end=torch.tensor([e for _, _, e in this], device=device),
                sink_end=sink_end.to(device),
                prompt_end=prompt_end.to(device),
            )
            decoder(
                input_ids=input_ids.to(device),
                attention_mask=torch.cat([cache.prompt_mask.to(device), round_mask.to(device)], dim=1),
                position_ids=positions.to(device),
                cache=cache,
                use_cache=True,
            )
            for layer in cache.layers:
                layer.end_replay_round(prompt_end.to(device))
    finally:
        cache.group.replay_span = None
    # rows before these positions stay whole (the header, or nothing past the sinks)
    header_end = torch.tensor(
        [s.first + (s.header if scorer.keep_header else 0) for s in sequences], device=device
    )
    scores = [layer.finish_replay(header_end) for layer in cache.layers]
    return scores, time.perf_counter() - start_time
