"""Turn a benchmark sample into the token ids the cache compresses and the ids fed after compression.

Two settings:

* ``query_agnostic`` (the default, as kvpress's benchmarks): only the context is compressed; the question
  arrives afterwards, so the cache cannot know what will be asked. This is the honest setting for a cache
  reused across questions.
* ``query_aware``: the question is inside the compressed prompt (what SnapKV's paper measures).

With a chat template the user turn is ``context + "\\n\\n" + question``; the split falls at the end of the
context (query-agnostic) or of the question (query-aware), and the assistant turn opens with the sample's
answer prefix. Both the full cache and every method see exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kvsqueeze.bench.tasks import Sample

SETTINGS = ("query_agnostic", "query_aware")


@dataclass(frozen=True)
class EncodedSample:
    """A sample as two runs of token ids."""

    compressed_ids: torch.Tensor  # (1, L_c): prefilled, then compressed
    followup_ids: torch.Tensor  # (1, L_f): fed after compression (question and/or assistant turn opening)

    @property
    def context_tokens(self) -> int:
        return self.compressed_ids.shape[1]


def encode_sample(
    tokenizer: PreTrainedTokenizerBase, sample: Sample, setting: str = "query_agnostic"
) -> EncodedSample:
    """Split ``sample`` into compressed and follow-up token ids for ``setting``."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    user = sample.context + "\n\n" + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        special = False
    else:
        text = user + "\nAnswer:"
        special = True
    start = text.index(sample.context)
    split = start + len(sample.context)
    if setting == "query_aware":
        split = text.index(sample.question, split) + len(sample.question)
    opening = (" " if special else "") + sample.answer_prefix if sample.answer_prefix else ""
    followup = text[split:] + opening
    compressed = tokenizer(text[:split], add_special_tokens=special, return_tensors="pt")["input_ids"]
    rest = tokenizer(followup, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return EncodedSample(compressed, rest)
