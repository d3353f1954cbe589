"""Runs NVIDIA kvpress presses for the kvsqueeze benchmark, inside kvpress's own virtual environment.

Standalone on purpose: kvpress pins an older transformers than kvsqueeze, so this script is run by the
kvpress venv's python (see :mod:`kvsqueeze.bench.kvpress_env`) and imports only the standard library,
torch, transformers and kvpress — never kvsqueeze.

    python kvpress_worker.py request.json result.json

The request holds ``model_dir``, ``requests``, ``presses`` (name -> recipe), ``ratios`` (each
``{"keep", "compression_ratio"}``), ``separator``, ``num_threads`` and ``share`` (default true); the
result holds the library versions and one row per (request, press, keep ratio) plus one ``"full"`` row
per request. Prompts are built like kvpress's ``KVPressTextGenerationPipeline``: the context goes
through the chat template up to the end of the user turn, the press compresses it, and the question,
the template's closing tokens and the answer prefix are fed afterwards with positions continuing from
the uncompressed context length. Decoding is greedy; teacher forcing is one forward over the question
and the teacher tokens.

Prefill once, compress many (``share`` true). kvpress presses compress in a forward hook that runs after
the layer's attention, so the hidden states of a prefill do not depend on the press:

* ``share: "prefill"`` recipes whose class keeps ``BasePress.forward_hook`` and ``BasePress.__call__``
  ride on one prefill per attention implementation (the default one is the full row's own prefill):
  our hook calls every such press's ``compress`` on each layer and keeps what it returns (and the
  ``masked_key_indices`` of presses that mask instead of dropping). Their rows say
  ``"prefill_shared": true`` and their ``prefill_seconds`` is the pass's time minus all the presses'
  compress time plus their own, i.e. what a standalone prefill with that press costs. The full row's
  ``prefill_seconds`` is the pass's time minus all compress time.
* ``share: "scores"`` recipes (KVzip) score once through the press's own context manager, at the first
  ratio that compresses; the other ratios only rerun ``compress_post`` on those scores (a top-k). All
  their rows report the one real run's ``prefill_seconds`` (scoring dominates) and
  ``"prefill_shared": true`` when there are several ratios.
* Anything else, and every press when ``share`` is false, gets its own prefill per ratio
  (``"prefill_shared": false``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# Run as a script, Python puts this folder first on sys.path, and its datasets.py would shadow the
# `datasets` package kvpress imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

MASKING_NOTE = "press masks evicted keys instead of dropping them: cache_bytes are the real tensor bytes"
Masks = list[Any]  # per layer: a press's masked_key_indices (batch, head, seq index tensors) or None


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[kvpress-worker] {message}", file=sys.stderr, flush=True)


def build_press(recipe: dict[str, Any], compression_ratio: float) -> Any:
    """A kvpress press from a recipe ``{"cls", "kwargs", "inner"}``; the ratio goes to the innermost."""
    import kvpress

    kwargs = dict(recipe.get("kwargs") or {})
    if recipe.get("inner"):
        kwargs["press"] = build_press(recipe["inner"], compression_ratio)
    else:
        kwargs["compression_ratio"] = compression_ratio
    return getattr(kvpress, recipe["cls"])(**kwargs)


def split_prompt(tokenizer: Any, context: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """(context text, question text) the way kvpress's pipeline splits a chat prompt."""
    if tokenizer.chat_template is None:
        return (tokenizer.bos_token or "") + context, question + "\n" + answer_prefix
    marker = "#" * (len(context) + 10)  # cannot occur inside the context
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + marker}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(marker)
    return head, question + tail + answer_prefix


def encode_request(
    tokenizer: Any, request: dict[str, Any], separator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, n) of the compressed part and of the part fed after compression."""
    question = separator + request["question"]
    if request.get("setting", "query_agnostic") == "query_aware":
        context, question = request["context"] + question, ""
    else:
        context = request["context"]
    context_text, question_text = split_prompt(tokenizer, context, question, request.get("answer_prefix", ""))

    def encode(text: str) -> torch.Tensor:
        return tokenizer.encode(text, return_tensors="pt", add_special_tokens=False)

    return encode(context_text), encode(question_text)


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a DynamicCache."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def masked_bytes(masks: Masks, cache: Any) -> int:
    """Bytes of the cache entries that head-wise presses (AdaKV, KVzip) mask instead of dropping."""
    total = 0
    for indices, cached in zip(masks, cache.layers, strict=False):
        if indices is not None:
            per_entry = 2 * cached.keys.shape[-1] * cached.keys.element_size()  # one key + one value
            total += int(indices[2].numel()) * per_entry
    return total


def module_masks(model: Any) -> Masks:
    """The head-wise masks a press left on the attention modules, one per layer."""
    return [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]


def set_masks(model: Any, masks: Masks) -> None:
    """Put a press's head-wise masks on the attention modules (kvpress's attention patch reads them)."""
    for layer, indices in zip(model.model.layers, masks, strict=True):
        layer.self_attn.masked_key_indices = indices


def clear_masks(model: Any) -> None:
    """Forget head-wise masks a previous press left on the attention modules."""
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "masked_key_indices"):
            layer.self_attn.masked_key_indices = None


def truncate_cache(cache: Any, lengths: list[int]) -> None:
    """Cut every layer back to its length after prefill (drops question and generated tokens)."""
    for layer, n in zip(cache.layers, lengths, strict=True):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]


def cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> Any:
    """A fresh DynamicCache holding one (B, H_kv, T, D) key and value tensor per layer."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer_idx, (layer_keys, layer_values) in enumerate(zip(keys, values, strict=True)):
        cache.update(layer_keys, layer_values, layer_idx)
    return cache


def owned(kept: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``kept``, cloned if it shares storage with ``source``.

    The source is the shared pass's full cache; kvpress's attention patch later writes fake keys into
    the cache a masking press answers with, in place, which must never reach the full cache.
    """
    if kept.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return kept.clone()
    return kept


class Run:
    """One model and tokenizer, and how to prefill, decode and score a request."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    def warm_up(self) -> None:
        """One short prefill and decode step, so the first timed run pays no one-off start-up costs."""
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache()
            self.model.model(input_ids=torch.ones(1, 32, dtype=torch.long), past_key_values=cache)
            self.step(torch.ones(1, 1, dtype=torch.long), cache, 32)

    def prefill(self, context_ids: torch.Tensor, manager: AbstractContextManager | None) -> tuple[Any, float]:
        """The cache after prefilling the context (1, n) inside ``manager``, and the wall time it took.

        ``manager`` is a press's context manager, :func:`capturing`, or None for a plain prefill.
        """
        from transformers import DynamicCache

        cache = DynamicCache()
        clear_masks(self.model)
        start = time.perf_counter()
        with manager or nullcontext():  # KVzip scores and compresses when the context exits: keep it timed
            self.model.model(input_ids=context_ids, past_key_values=cache)
        return cache, time.perf_counter() - start

    def step(self, ids: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        """Logits (vocab,) after feeding ``ids`` (1, n) at positions ``position``, ``position + 1``, ..."""
        positions = torch.arange(position, position + ids.shape[1]).unsqueeze(0)
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=1)
        return out.logits[0, -1].float()

    def generate(
        self, question_ids: torch.Tensor, cache: Any, context_len: int, max_new: int
    ) -> tuple[list[int], float]:
        """Greedy tokens after the question, stopping at an end-of-sequence token, and the seconds the
        one-token steps took (after the question's forward: what decode tokens/s measures, as in kvsqueeze)."""
        logits = self.step(question_ids, cache, context_len)
        position = context_len + question_ids.shape[1]
        tokens = [int(logits.argmax())]
        start = time.perf_counter()
        while len(tokens) < max_new and tokens[-1] not in self.stop_ids:
            logits = self.step(torch.tensor([[tokens[-1]]]), cache, position)
            position += 1
            tokens.append(int(logits.argmax()))
        return tokens, time.perf_counter() - start

    def teacher_logprobs(
        self, question_ids: torch.Tensor, cache: Any, context_len: int, teacher: list[int]
    ) -> torch.Tensor:
        """Next-token log-probabilities (len(teacher), vocab) while feeding the teacher tokens.

        One forward of the question and all teacher tokens but the last; the logits from the last
        question position onward are the ones token-by-token feeding would give.
        """
        teacher_ids = torch.tensor([teacher[:-1]], dtype=torch.long)  # (1, T - 1)
        ids = torch.cat([question_ids, teacher_ids], dim=1)  # (1, n_question + T - 1)
        positions = torch.arange(context_len, context_len + ids.shape[1]).unsqueeze(0)
        out = self.model(
            input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=len(teacher)
        )
        return torch.log_softmax(out.logits[0].float(), -1)  # (T, vocab)


def fidelity(full: torch.Tensor, compressed: torch.Tensor) -> tuple[float, float]:
    """Mean KL(full || compressed) over steps, and the fraction of steps whose argmax agrees."""
    kl = (full.exp() * (full - compressed)).sum(-1).clamp_min(0.0)
    agree = (full.argmax(-1) == compressed.argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


def answer(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    cache: Any,
    masks: Masks,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Generate and (with teacher ids) teacher-force from a prefilled cache; row fields and log-probs.

    ``masks`` go onto the attention modules for the answer and are cleared afterwards. The fields are
    all but ``prefill_seconds``, ``prefill_shared``, ``kl`` and ``top1_agreement``.
    """
    context_ids, question_ids = ids
    context_len = context_ids.shape[1]
    size, masked = cache_bytes(cache), masked_bytes(masks, cache)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    teacher = [int(t) for t in request.get("teacher_ids") or []]
    logprobs = None
    set_masks(run.model, masks)
    try:
        start = time.perf_counter()
        tokens, step_seconds = run.generate(question_ids, cache, context_len, int(request["max_new_tokens"]))
        decode_seconds = time.perf_counter() - start
        if teacher:
            truncate_cache(cache, lengths)
            logprobs = run.teacher_logprobs(question_ids, cache, context_len, teacher)
    finally:
        clear_masks(run.model)
    row: dict[str, Any] = {
        "prediction": run.tokenizer.decode(tokens, skip_special_tokens=True),
        "decode_seconds": decode_seconds,
        "step_seconds": step_seconds,
        "new_tokens": len(tokens),
        "cache_bytes": size,
        "effective_cache_bytes": size - masked,
        "context_tokens": context_len,
    }
    if logprobs is not None:
        row["teacher_agreement"] = float((logprobs.argmax(-1) == torch.tensor(teacher)).float().mean())
    if masked:
        row["note"] = MASKING_NOTE
    return row, logprobs


def press_fields(
    fields: dict[str, Any],
    logprobs: torch.Tensor | None,
    full_logprobs: torch.Tensor | None,
    prefill_seconds: float,
    shared: bool,
) -> dict[str, Any]:
    """A press row's fields: :func:`answer`'s, the prefill time and the fidelity to the full run."""
    row = {**fields, "prefill_seconds": prefill_seconds, "prefill_shared": shared}
    row["kl"], row["top1_agreement"] = None, None
    if logprobs is not None and full_logprobs is not None:
        row["kl"], row["top1_agreement"] = fidelity(full_logprobs, logprobs)
    return row


def set_attention(model: Any, implementation: str) -> None:
    """Switch the attention implementation (ObservedAttention needs eager attention weights)."""
    if model.config._attn_implementation != implementation:
        model.set_attn_implementation(implementation)


@contextmanager
def attention(model: Any, implementation: str | None) -> Iterator[None]:
    """Run with ``implementation`` (None: keep the current one), then switch back."""
    default = model.config._attn_implementation
    set_attention(model, implementation or default)
    try:
        yield
    finally:
        set_attention(model, default)


def error_text(exc: BaseException) -> str:
    """One line naming the exception and where kvpress raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {message}{where}"


# --- which presses share what -----------------------------------------------------------------------

ALONE, PREFILL, SCORES = "alone", "prefill", "scores"


@dataclass(eq=False)
class Slot:
    """One (press, keep ratio) of a request: its press, how it runs, and its row fields once done."""

    name: str
    recipe: dict[str, Any]
    ratio: dict[str, float]  # {"keep", "compression_ratio"}
    press: Any = None
    mode: str = ALONE
    fields: dict[str, Any] = field(default_factory=dict)  # answer fields, or {"error": ...}

    @property
    def attention(self) -> str | None:
        """The attention implementation the recipe asks for (None: the model's default)."""
        return self.recipe.get("attn_implementation")


def shares_prefill(press: Any) -> bool:
    """Whether the press compresses through kvpress's stock hook (so one prefill can feed it)."""
    from kvpress.presses.base_press import BasePress

    cls = type(press)
    return cls.forward_hook is BasePress.forward_hook and cls.__call__ is BasePress.__call__


def rescorable(press: Any) -> bool:
    """Whether the press keeps ratio-free scores in ``score_val`` and prunes them in ``compress_post``."""
    return hasattr(press, "score_val") and callable(getattr(press, "compress_post", None))


def share_mode(recipe: dict[str, Any], press: Any) -> str:
    """PREFILL, SCORES or ALONE: what the recipe's ``share`` asks for, if the press's class allows it."""
    wanted = recipe.get("share")
    if wanted == PREFILL and shares_prefill(press):
        return PREFILL
    if wanted == SCORES and rescorable(press):
        return SCORES
    return ALONE


def make_slots(job: dict[str, Any]) -> list[Slot]:
    """One slot per (press, ratio), in row order; a press that cannot be built gets its error."""
    share = job.get("share", True)
    slots = []
    for name, recipe in job["presses"].items():
        for ratio in job["ratios"]:
            slot = Slot(name, recipe, ratio)
            try:
                slot.press = build_press(recipe, ratio["compression_ratio"])
                slot.mode = share_mode(recipe, slot.press) if share else ALONE
            except Exception as exc:  # reported in the row
                slot.fields = {"error": error_text(exc)}
                log(f"{name} keep={ratio['keep']}: {slot.fields['error']}")
            slots.append(slot)
    return slots


# --- prefill once, compress many ----------------------------------------------------------------------


@dataclass(eq=False)
class Capture:
    """What one press kept of each layer during a shared prefill, and the time its calls took."""

    press: Any
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (B, H_kv, T_kept, D)
    values: list[torch.Tensor] = field(default_factory=list)  # per layer (B, H_kv, T_kept, D)
    masks: Masks = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def start(self, model: Any) -> None:
        """``post_init_from_model``, as ``BasePress.__call__`` does before hooking."""
        start = time.perf_counter()
        try:
            self.press.post_init_from_model(model)
        except Exception as exc:  # this press fails, the pass goes on
            self.error = error_text(exc)
        self.seconds += time.perf_counter() - start

    def compress(
        self,
        module: Any,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> None:
        """Run the press on one layer's full keys and values (B, H_kv, T, D) and keep the result."""
        if self.error is not None:
            return
        module.masked_key_indices = None
        start = time.perf_counter()
        try:
            kept_keys, kept_values = self.press.compress(
                module, hidden_states, keys, values, attentions, kwargs
            )
        except Exception as exc:  # this press fails, the pass goes on
            self.error = error_text(exc)
            return
        finally:
            self.seconds += time.perf_counter() - start
            indices = getattr(module, "masked_key_indices", None)
            module.masked_key_indices = None  # the next press starts from an unmasked layer
        self.keys.append(owned(kept_keys, keys))
        self.values.append(owned(kept_values, values))
        self.masks.append(indices)


@contextmanager
def capturing(model: Any, captures: list[Capture]) -> Iterator[None]:
    """Hooks that feed every capture's press each attention layer of one prefill.

    The set-up of ``BasePress.__call__`` (``post_init_from_model``, the shared rotary embedding) for
    all presses at once; in the hook, each press's ``compress`` reads the layer's cache the way
    ``BasePress.forward_hook`` does, but the cache itself is left whole.
    """
    if not captures:
        yield
        return
    from kvpress.utils import extract_keys_and_values

    for capture in captures:
        capture.start(model)

    def hook(module: Any, args: tuple, kwargs: dict[str, Any], output: tuple) -> None:
        hidden_states = kwargs["hidden_states"]  # (B, T, hidden)
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)  # (B, H_kv, T, D)
        for capture in captures:
            capture.compress(module, hidden_states, keys, values, output[1], kwargs)

    hooks = []
    try:
        for layer in model.model.layers:
            layer.self_attn.rotary_emb = model.model.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in hooks:
            handle.remove()


def shared_prefill(run: Run, context_ids: torch.Tensor, captures: list[Capture]) -> tuple[Any, float]:
    """One prefill feeding ``captures``: the full cache and the plain prefill time (compress time out).

    If the pass itself fails, every capture carries its error and the exception propagates.
    """
    try:
        cache, seconds = run.prefill(context_ids, capturing(run.model, captures))
    except Exception as exc:
        for capture in captures:
            capture.error = capture.error or f"the shared prefill failed: {error_text(exc)}"
        raise
    return cache, seconds - sum(capture.seconds for capture in captures)


def answer_capture(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    slot: Slot,
    capture: Capture,
    plain_seconds: float,
    full_logprobs: torch.Tensor | None,
) -> dict[str, Any]:
    """A shared-prefill row: answer from the press's captured cache and masks."""
    if capture.error is not None:
        return {"error": capture.error}
    cache = cache_from(capture.keys, capture.values)  # copies: the captured tensors can go
    capture.keys, capture.values = [], []
    with attention(run.model, slot.attention):
        fields, logprobs = answer(run, request, ids, cache, capture.masks)
    return press_fields(fields, logprobs, full_logprobs, plain_seconds + capture.seconds, shared=True)


def settle(request: dict[str, Any], slot: Slot, work: Callable[[], dict[str, Any]]) -> None:
    """``slot.fields = work()``, or the error it raised; one log line either way."""
    started = time.perf_counter()
    try:
        slot.fields = work()
    except Exception as exc:  # one failing press must not lose the others
        slot.fields = {"error": error_text(exc)}
    status = slot.fields.get("error", f"{time.perf_counter() - started:.1f}s")
    shared = " (shared prefill)" if slot.fields.get("prefill_shared") else ""
    log(f"{request['id']} {slot.name} keep={slot.ratio['keep']}: {status}{shared}")


def run_shared_group(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    slots: list[Slot],
    full_logprobs: torch.Tensor | None,
) -> None:
    """Shared-prefill presses asking for a non-default attention: one pass in it, then their answers."""
    captures = [Capture(slot.press) for slot in slots]
    plain_seconds = 0.0
    try:
        with attention(run.model, slots[0].attention):
            _, plain_seconds = shared_prefill(run, ids[0], captures)
    except Exception:  # the captures carry the error
        pass
    for slot, capture in zip(slots, captures, strict=True):
        settle(
            request,
            slot,
            partial(answer_capture, run, request, ids, slot, capture, plain_seconds, full_logprobs),
        )


# --- KVzip: score once, prune per ratio ---------------------------------------------------------------


def score_once(run: Run, context_ids: torch.Tensor, press: Any) -> tuple[Any, float, torch.Tensor | None]:
    """Prefill through the press's own context manager; its cache, time and ratio-free scores.

    The scores are copied as ``compress_post`` starts (before it raises the sink scores in place and
    before the context manager's clean-up forgets them), shape (layers, B, H_kv, T).
    """
    kept: dict[str, torch.Tensor] = {}
    compress_post = press.compress_post

    def keeping_scores(model: Any) -> None:
        kept["scores"] = press.score_val.clone()
        compress_post(model)

    press.compress_post = keeping_scores
    try:
        cache, seconds = run.prefill(context_ids, press(run.model))
    finally:
        del press.compress_post  # the class's method again
    return cache, seconds, kept.get("scores")


def prune(model: Any, press: Any, scores: torch.Tensor | None) -> Masks:
    """The masks ``press.compress_post`` picks from saved scores at the press's own ratio.

    ``compress_post`` reads ``compression_ratio``, ``n_sink``, ``layerwise`` and ``score_val``.
    """
    clear_masks(model)
    press.score_val = None if scores is None else scores.clone()
    try:
        press.compress_post(model)
        return module_masks(model)
    finally:
        press.score_val = None
        clear_masks(model)


@dataclass
class Scoring:
    """The one real run of a score-once press: its cache, time, scores and the masks it chose."""

    slot: Slot
    cache: Any
    seconds: float
    scores: torch.Tensor | None  # (layers, B, H_kv, T); None if it ran at compression ratio 0
    masks: Masks
    shared: bool  # its scores serve other ratios too


def answer_scored(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    slot: Slot,
    scoring: Scoring,
    full_logprobs: torch.Tensor | None,
) -> dict[str, Any]:
    """A score-once row: the scoring run's masks, or its scores pruned at this slot's ratio.

    Each row answers from its own copy of the scoring run's cache (the attention patch writes fake
    keys into the cache it decodes with).
    """
    with attention(run.model, slot.attention):
        masks = scoring.masks if slot is scoring.slot else prune(run.model, slot.press, scoring.scores)
        layers = scoring.cache.layers
        cache = cache_from(
            [layer.keys.clone() for layer in layers], [layer.values.clone() for layer in layers]
        )
        fields, logprobs = answer(run, request, ids, cache, masks)
    return press_fields(fields, logprobs, full_logprobs, scoring.seconds, shared=scoring.shared)


def run_scored_group(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    slots: list[Slot],
    full_logprobs: torch.Tensor | None,
) -> None:
    """One score-once press at all its ratios: score at the first ratio that compresses, prune the rest.

    Every row reports the scoring run's ``prefill_seconds``: scoring dominates, pruning is a top-k.
    """
    scorer = next((slot for slot in slots if slot.ratio["compression_ratio"] > 0), slots[0])
    try:
        with attention(run.model, scorer.attention):
            cache, seconds, scores = score_once(run, ids[0], scorer.press)
            scoring = Scoring(scorer, cache, seconds, scores, module_masks(run.model), len(slots) > 1)
            clear_masks(run.model)
    except Exception as exc:  # every ratio needed this run
        for slot in slots:
            settle(request, slot, partial(dict, error=error_text(exc)))
        return
    for slot in slots:
        settle(request, slot, partial(answer_scored, run, request, ids, slot, scoring, full_logprobs))


# --- one prefill per press and ratio ------------------------------------------------------------------


def run_alone(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    slot: Slot,
    full_logprobs: torch.Tensor | None,
) -> dict[str, Any]:
    """A row from the press's own prefill, through its own context manager."""
    with attention(run.model, slot.attention):
        cache, seconds = run.prefill(ids[0], slot.press(run.model))
        fields, logprobs = answer(run, request, ids, cache, module_masks(run.model))
    return press_fields(fields, logprobs, full_logprobs, seconds, shared=False)


# --- one request --------------------------------------------------------------------------------------


def run_full(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    captures: list[Capture],
) -> tuple[dict[str, Any], torch.Tensor | None, float]:
    """The full row's fields, its log-probs and its plain prefill time; the prefill feeds ``captures``."""
    try:
        cache, plain_seconds = shared_prefill(run, ids[0], captures)
        fields, logprobs = answer(run, request, ids, cache, module_masks(run.model))
    except Exception as exc:  # reported in the row
        return {"error": error_text(exc)}, None, 0.0
    scored = logprobs is not None
    fields.update(
        prefill_seconds=plain_seconds,
        prefill_shared=bool(captures),
        kl=0.0 if scored else None,
        top1_agreement=1.0 if scored else None,
    )
    return fields, logprobs, plain_seconds


def grouped(slots: list[Slot], key: Callable[[Slot], Any]) -> list[list[Slot]]:
    """``slots`` split by ``key``, groups in order of first appearance."""
    groups: dict[Any, list[Slot]] = {}
    for slot in slots:
        groups.setdefault(key(slot), []).append(slot)
    return list(groups.values())


@torch.inference_mode()
def run_request(run: Run, request: dict[str, Any], job: dict[str, Any]) -> list[dict[str, Any]]:
    """The full row and one row per (press, keep ratio) for one request (see the module docstring)."""
    default_attention = run.model.config._attn_implementation
    ids = encode_request(run.tokenizer, request, job.get("separator", "\n\n"))
    slots = make_slots(job)
    pending = [slot for slot in slots if not slot.fields]
    shared = [slot for slot in pending if slot.mode == PREFILL]
    on_full = [slot for slot in shared if (slot.attention or default_attention) == default_attention]
    captures = [Capture(slot.press) for slot in on_full]
    started = time.perf_counter()
    full_fields, full_logprobs, plain_seconds = run_full(run, request, ids, captures)
    log(f"{request['id']} full: {full_fields.get('error', f'{time.perf_counter() - started:.1f}s')}")
    for slot, capture in zip(on_full, captures, strict=True):
        work = partial(answer_capture, run, request, ids, slot, capture, plain_seconds, full_logprobs)
        settle(request, slot, work)
    for group in grouped([slot for slot in shared if slot not in on_full], lambda s: s.attention):
        run_shared_group(run, request, ids, group, full_logprobs)
    for group in grouped([slot for slot in pending if slot.mode == SCORES], lambda s: s.name):
        run_scored_group(run, request, ids, group, full_logprobs)
    for slot in [slot for slot in pending if slot.mode == ALONE]:
        settle(request, slot, partial(run_alone, run, request, ids, slot, full_logprobs))
    base = {"id": request["id"], "full_cache_bytes": full_fields.get("cache_bytes")}
    rows = [{**base, "press": "full", "keep_ratio": 1.0, **full_fields}]
    for slot in slots:
        rows.append({**base, "press": slot.name, "keep_ratio": slot.ratio["keep"], **slot.fields})
    return rows


def main(argv: list[str]) -> int:
    """Entry point: ``kvpress_worker.py request.json result.json``."""
    if len(argv) != 2:
        print("usage: kvpress_worker.py request.json result.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    import kvpress  # noqa: F401 - patches the attention functions for head-wise presses
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if job.get("num_threads"):
        torch.set_num_threads(int(job["num_threads"]))
    model_dir = job["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    run = Run(model, tokenizer)
    run.warm_up()
    rows: list[dict[str, Any]] = []
    for request in job["requests"]:
        rows.extend(run_request(run, request, job))
    result = {
        "kvpress_version": kvpress_version(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
    }
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


def kvpress_version() -> str:
    """The installed kvpress distribution's version."""
    from importlib.metadata import version

    return version("kvpress")


def cli(argv: list[str]) -> int:
    """``main`` with a one-line summary of any failure as the last line on stderr (the caller shows it)."""
    try:
        return main(argv)
    except Exception as exc:  # the traceback is printed, the summary goes last
        traceback.print_exc()
        print(error_text(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
