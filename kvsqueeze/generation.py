"""``kvsqueeze.generate``: one call from prompt to answer, with the cache compressed and measured."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.cache import SqueezeCache
from kvsqueeze.methods import Method


@dataclass
class GenerationResult:
    """What a :func:`generate` call produced and what its cache cost."""

    texts: list[str]
    method: str
    budget: str  # the keep budget asked for ("" for a method that keeps every row)
    prompt_tokens: list[int]  # real (unpadded) prompt tokens per sequence
    new_tokens: int  # tokens generated per sequence (the longest)
    cache_bytes: int  # bytes the compressed cache held at the end, measured from its tensors
    full_cache_bytes: int  # bytes a stock DynamicCache would hold for the same tokens
    prefill_seconds: float
    decode_seconds: float
    compression_seconds: float
    token_ids: torch.Tensor = field(repr=False)  # (B, new_tokens)

    @property
    def text(self) -> str:
        """The first sequence's text."""
        return self.texts[0]

    @property
    def memory_ratio(self) -> float:
        return self.cache_bytes / max(1, self.full_cache_bytes)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, self.new_tokens - 1)
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        """One line comparing cache bytes, full vs kept."""
        return (
            f"cache: {format_bytes(self.full_cache_bytes)} full vs {format_bytes(self.cache_bytes)} kept "
            f"({self.memory_ratio:.1%}) | {self.method}{f' @ {self.budget}' if self.budget else ''} | "
            f"prompt {max(self.prompt_tokens)} tok, "
            f"{self.new_tokens} new"
        )


def format_bytes(n: int) -> str:
    """Human-readable byte count (KiB/MiB/GiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class _StepClock(LogitsProcessor):
    """Records the wall time of every generation step (the first call comes right after prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize prompts (through the chat template when the tokenizer has one), left-padded."""
    for p in prompts:
        if not p or not p.strip():
            raise ValueError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        add_special = False
    else:
        texts, add_special = prompts, True
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)


def check_prompt_length(model: PreTrainedModel, prompt_tokens: int, max_new_tokens: int = 0) -> None:
    """One-line ``ValueError`` when the prompt does not fit the model's positions."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens (+{max_new_tokens} new) exceeds the model's {limit} positions"
        )


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[str],
    method: str | Method = "full",
    budget: float | int | str = 1.0,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    **method_params: object,
) -> GenerationResult:
    """Generate from one prompt or a batch with a compressed cache, and measure it.

    Args:
        model, tokenizer: from :func:`kvsqueeze.load_model` or any supported Hugging Face causal LM.
        prompt: a string or a list of strings (batched with left padding), or a prompt prepared by
            :class:`kvsqueeze.reuse.KVReuse` (its cache is used as it is; ``method`` must be ``full``).
        method: a method name or a built method; ``budget``: ratio in (0, 1] or tokens.
        max_new_tokens, do_sample, temperature, top_p, seed: as in ``model.generate``.
        chat: wrap prompts in the tokenizer's chat template when it has one.
        **method_params: hyperparameter overrides for the method.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if _is_prepared(prompt):
        return _generate_prepared(
            model, tokenizer, prompt, max_new_tokens, do_sample, temperature, top_p, seed, method
        )
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("the prompt is empty")
    cache = SqueezeCache(model, method, budget, tokenizer=tokenizer, **method_params)
    inputs = encode_prompts(tokenizer, prompts, chat=chat).to(model.device)
    lengths = inputs["attention_mask"].sum(-1)
    check_prompt_length(model, inputs["input_ids"].shape[1], max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    clock = _StepClock()
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    start = time.perf_counter()
    out = model.generate(
        **inputs,
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1] :]
    first = clock.times[0] if clock.times else end
    last = clock.times[-1] if clock.times else end
    return GenerationResult(
        texts=tokenizer.batch_decode(new, skip_special_tokens=True),
        method=cache.method.name,
        budget=str(cache.budget) if cache.method.uses_budget else "",  # full, kivi, zipcache: none
        prompt_tokens=lengths.tolist(),
        new_tokens=new.shape[1],
        cache_bytes=cache.nbytes(),
        full_cache_bytes=cache.full_nbytes(),
        prefill_seconds=first - start,
        decode_seconds=last - first,
        compression_seconds=cache.compression_seconds(),
        token_ids=new,
    )


def _is_prepared(prompt: object) -> bool:
    """A :class:`kvsqueeze.reuse.ReusedPrompt` (ids plus a cache of all but the last token)."""
    return hasattr(prompt, "input_ids") and hasattr(prompt, "cache") and hasattr(prompt, "reused_tokens")


def _generate_prepared(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prepared: object,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int | None,
    method: str | Method,
) -> GenerationResult:
    """:func:`generate` from a prompt whose cache a reuse policy built; its prefill is that policy's time
    plus the last token's forward."""
    if method != "full":
        raise ValueError("a prepared (reused) prompt brings its own cache: use method='full'")
    ids = prepared.input_ids.to(model.device)
    check_prompt_length(model, ids.shape[1], max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    clock = _StepClock()
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        cache=prepared.cache,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    end = time.perf_counter()
    new = out[:, ids.shape[1] :]
    first = clock.times[0] if clock.times else end
    last = clock.times[-1] if clock.times else end
    nbytes = sum(
        t.numel() * t.element_size() for layer in prepared.cache.layers for t in (layer.keys, layer.values)
    )
    return GenerationResult(
        texts=tokenizer.batch_decode(new, skip_special_tokens=True),
        method=f"reuse:{prepared.policy}",
        budget="1.0",
        prompt_tokens=[ids.shape[1]],
        new_tokens=new.shape[1],
        cache_bytes=nbytes,
        full_cache_bytes=nbytes,
        prefill_seconds=prepared.seconds + (first - start),
        decode_seconds=last - first,
        compression_seconds=0.0,
        token_ids=new,
    )
