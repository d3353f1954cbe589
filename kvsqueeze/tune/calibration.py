"""The tuner's fitness: KL against the full cache over teacher-forced continuations of offline documents.

A calibration sample is an offline document (:mod:`kvsqueeze.calibrate.documents`: standard-library prose,
source and reference text, never the benchmark's samples) cut into a context and the continuation that
follows it in the document. The context is prefilled once into a full cache that records what scorers
need; the continuation's next-token log-probabilities under that cache are the reference. A candidate's
loss on the sample is the mean KL(full || candidate) over the continuation, after the recorded prefill is
compressed by the candidate (``fork``): no candidate pays for a prefill (EvoPress §5.1's speed-up, exact
for methods that compress after the prompt), and what a scorer computes over a prompt (column sums,
ZipCache's saliency) is computed once per document and shared by every candidate (``reuse_attention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.bench.runner import continuation_logprobs, fidelity
from kvsqueeze.cache import SqueezeCache
from kvsqueeze.calibrate.documents import calibration_documents
from kvsqueeze.methods.base import Method
from kvsqueeze.methods.profiled import LayerProfile, with_profile


@dataclass
class CalibrationSample:
    """One document: its prefilled context and the full cache's view of its continuation."""

    source: SqueezeCache  # full, ``record_prefill=True``, holding the context
    continuation: torch.Tensor  # (1, Y) the document's next tokens
    reference: torch.Tensor  # (Y, V) fp32 log-probabilities after each of them, full cache


@torch.inference_mode()
def calibration_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    context_tokens: int,
    continuation_tokens: int,
    *,
    progress: bool = True,
) -> list[CalibrationSample]:
    """``count`` offline documents, each prefilled once (a progress bar counts them)."""
    if count < 1 or context_tokens < 2 or continuation_tokens < 1:
        raise ValueError("calibration needs >= 1 document, >= 2 context tokens and >= 1 continuation token")
    documents = calibration_documents(tokenizer, count, context_tokens + continuation_tokens)
    samples = []
    for ids in tqdm(documents, desc="calibration prefill", unit="doc", disable=not progress):
        ids = torch.tensor([ids], dtype=torch.long)
        context, continuation = ids[:, :context_tokens], ids[:, context_tokens:]
        source = SqueezeCache(model, "full", record_prefill=True, tokenizer=tokenizer)
        model(context, cache=source, logits_to_keep=1)
        reference = continuation_logprobs(model, source.fork("full"), continuation, stepwise=False)
        samples.append(CalibrationSample(source, continuation, reference))
    return samples


@torch.inference_mode()
def profile_loss(
    model: PreTrainedModel,
    samples: Sequence[CalibrationSample],
    method: Method,
    budget: float,
    keep_ratios: Sequence[float],
) -> float:
    """Mean KL of ``method`` with per-layer keep ratios ``keep_ratios`` at ``budget`` over ``samples``."""
    return method_loss(
        model, samples, with_profile(method, LayerProfile(keep_ratios=list(keep_ratios))), budget
    )


@torch.inference_mode()
def method_loss(
    model: PreTrainedModel,
    samples: Sequence[CalibrationSample],
    method: Method,
    budget: float,
    stepwise: bool | None = None,
) -> float:
    """Mean KL of ``method`` (a profiled one: layer budgets or bits) at ``budget`` over ``samples``; the
    continuation is fed as one chunk where that is exact (:func:`continuation_in_one_chunk`, with
    ``stepwise=None``), else token by token, or as ``stepwise`` tells."""
    losses = []
    for sample in samples:
        cache = sample.source.fork(method, budget, reuse_attention=True)  # prompt scores once per sample
        one_chunk = continuation_in_one_chunk(
            method, sample.source.get_seq_length(), sample.continuation.shape[-1]
        )
        each = not one_chunk if stepwise is None else stepwise
        logprobs = continuation_logprobs(model, cache, sample.continuation, each)
        losses.append(fidelity(sample.reference, logprobs)[0])  # the bench's KL(full || candidate)
    return sum(losses) / len(losses)


def continuation_in_one_chunk(method: Method, context_tokens: int, continuation_tokens: int) -> bool:
    """Whether a continuation of ``continuation_tokens`` after a ``context_tokens`` prompt gives the same
    log-probabilities fed as one chunk as token by token: always for a method whose cache does not change
    while decoding; for a pure quantizer (no eviction, no selection) when no block of its residual is
    quantized before the continuation's last token (it attends first, then its block is quantized)."""
    components = method.components()
    if not components.decodes_stepwise:
        return True
    quantize = components.quantize
    if method.uses_budget or components.select is not None or quantize is None:
        return False
    held = context_tokens % quantize.block if quantize.keep_remainder else 0  # residual after the prompt
    return held + continuation_tokens - 1 < quantize.block


def fitness_key(
    model: PreTrainedModel, method: Method, budget: float, documents: int, context: int, continuation: int
) -> dict:
    """What a search's losses depend on besides the candidates (a saved search resumes only under the same):
    the model and its dtype, the method with its parameters, the budget and the calibration documents."""
    return {
        "model": str(getattr(model.config, "name_or_path", "")),
        "dtype": str(model.dtype),
        "method": repr(method),
        "budget": budget,
        "documents": [documents, context, continuation],
    }
