"""Runs NVIDIA kvpress presses for the kvsqueeze benchmark, inside kvpress's own virtual environment.

Standalone on purpose: kvpress pins an older transformers than kvsqueeze, so this script is run by the
kvpress venv's python (see :mod:`kvsqueeze.bench.kvpress_env`) and imports only the standard library,
torch, transformers and kvpress — never kvsqueeze.

    python kvpress_worker.py request.json result.json

The request holds ``model_dir``, ``requests``, ``presses`` (name -> recipe), ``ratios`` (each
``{"keep", "compression_ratio"}``), ``separator`` and ``num_threads``; the result holds the library
versions and one row per (request, press, keep ratio) plus one ``"full"`` row per request. Prompts are built like kvpress's ``KVPressTextGenerationPipeline``:
the context goes through the chat template up to the end of the user turn, the press compresses it,
and the question, the template's closing tokens and the answer prefix are fed afterwards with positions
continuing from the uncompressed context length. Decoding is greedy.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

# Run as a script, Python puts this folder first on sys.path, and its datasets.py would shadow the
# `datasets` package kvpress imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

MASKING_NOTE = "press masks evicted keys instead of dropping them: cache_bytes are the real tensor bytes"


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


def masked_bytes(model: Any, cache: Any) -> int:
    """Bytes of the cache entries that head-wise presses (AdaKV, KVzip) mask instead of dropping."""
    total = 0
    for layer, cached in zip(model.model.layers, cache.layers, strict=False):
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        if indices is not None:
            per_entry = 2 * cached.keys.shape[-1] * cached.keys.element_size()  # one key + one value
            total += int(indices[2].numel()) * per_entry
    return total


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


class Run:
    """One model and tokenizer, and how to prefill, decode and score a request with a press."""

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

    def prefill(self, context_ids: torch.Tensor, press: Any) -> tuple[Any, float]:
        """The cache after prefilling (and compressing) the context, and the wall time it took."""
        from transformers import DynamicCache

        cache = DynamicCache()
        clear_masks(self.model)
        manager: AbstractContextManager = press(self.model) if press is not None else nullcontext()
        start = time.perf_counter()
        with manager:  # KVzip scores and compresses when the context exits: keep it inside the clock
            self.model.model(input_ids=context_ids, past_key_values=cache)
        return cache, time.perf_counter() - start

    def step(self, ids: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        """Logits (vocab,) after feeding ``ids`` (1, n) at positions ``position``, ``position + 1``, ..."""
        positions = torch.arange(position, position + ids.shape[1]).unsqueeze(0)
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=1)
        return out.logits[0, -1].float()

    def generate(self, question_ids: torch.Tensor, cache: Any, context_len: int, max_new: int) -> list[int]:
        """Greedy tokens after the question, stopping at an end-of-sequence token."""
        logits = self.step(question_ids, cache, context_len)
        position = context_len + question_ids.shape[1]
        tokens = [int(logits.argmax())]
        while len(tokens) < max_new and tokens[-1] not in self.stop_ids:
            logits = self.step(torch.tensor([[tokens[-1]]]), cache, position)
            position += 1
            tokens.append(int(logits.argmax()))
        return tokens

    def teacher_logprobs(
        self, question_ids: torch.Tensor, cache: Any, context_len: int, teacher: list[int]
    ) -> torch.Tensor:
        """Next-token log-probabilities (len(teacher), vocab) while feeding the teacher tokens."""
        rows = [torch.log_softmax(self.step(question_ids, cache, context_len), -1)]
        position = context_len + question_ids.shape[1]
        for token in teacher[:-1]:
            rows.append(torch.log_softmax(self.step(torch.tensor([[token]]), cache, position), -1))
            position += 1
        return torch.stack(rows)


def fidelity(full: torch.Tensor, compressed: torch.Tensor) -> tuple[float, float]:
    """Mean KL(full || compressed) over steps, and the fraction of steps whose argmax agrees."""
    kl = (full.exp() * (full - compressed)).sum(-1).clamp_min(0.0)
    agree = (full.argmax(-1) == compressed.argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


def run_one(
    run: Run,
    request: dict[str, Any],
    ids: tuple[torch.Tensor, torch.Tensor],
    press: Any,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Prefill, generate and (with teacher ids) teacher-force one request; a row and the log-probs."""
    context_ids, question_ids = ids
    context_len = context_ids.shape[1]
    with torch.inference_mode():
        cache, prefill_seconds = run.prefill(context_ids, press)
        size = cache_bytes(cache)
        masked = masked_bytes(run.model, cache)
        lengths = [layer.keys.shape[2] for layer in cache.layers]
        start = time.perf_counter()
        tokens = run.generate(question_ids, cache, context_len, int(request["max_new_tokens"]))
        decode_seconds = time.perf_counter() - start
        logprobs = None
        teacher = request.get("teacher_ids") or []
        if teacher:
            truncate_cache(cache, lengths)
            teacher = [int(t) for t in teacher]
            logprobs = run.teacher_logprobs(question_ids, cache, context_len, teacher)
    row = {
        "prediction": run.tokenizer.decode(tokens, skip_special_tokens=True),
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
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


def set_attention(model: Any, implementation: str) -> None:
    """Switch the attention implementation (ObservedAttention needs eager attention weights)."""
    if model.config._attn_implementation != implementation:
        model.set_attn_implementation(implementation)


def error_text(exc: BaseException) -> str:
    """One line naming the exception and where kvpress raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {message}{where}"


def run_request(run: Run, request: dict[str, Any], job: dict[str, Any]) -> list[dict[str, Any]]:
    """The full row and one row per (press, keep ratio) for one request."""
    base = {"id": request["id"]}
    default_attention = run.model.config._attn_implementation
    ids = encode_request(run.tokenizer, request, job.get("separator", "\n\n"))
    rows: list[dict[str, Any]] = []
    try:
        full_row, full_logprobs = run_one(run, request, ids, None)
        scored = full_logprobs is not None
        full_row.update(kl=0.0 if scored else None, top1_agreement=1.0 if scored else None)
        full_bytes: int | None = full_row["cache_bytes"]
    except Exception as exc:  # reported in the row
        full_row, full_logprobs, full_bytes = {"error": error_text(exc)}, None, None
    rows.append({**base, "press": "full", "keep_ratio": 1.0, "full_cache_bytes": full_bytes, **full_row})
    for name, recipe in job["presses"].items():
        for ratio in job["ratios"]:
            keep = ratio["keep"]
            row: dict[str, Any] = {**base, "press": name, "keep_ratio": keep, "full_cache_bytes": full_bytes}
            started = time.perf_counter()
            try:
                set_attention(run.model, recipe.get("attn_implementation") or default_attention)
                press = build_press(recipe, ratio["compression_ratio"])
                result, logprobs = run_one(run, request, ids, press)
                row.update(result, kl=None, top1_agreement=None)
                if logprobs is not None and full_logprobs is not None:
                    row["kl"], row["top1_agreement"] = fidelity(full_logprobs, logprobs)
            except Exception as exc:  # one failing press must not lose the others
                row["error"] = error_text(exc)
            finally:
                set_attention(run.model, default_attention)
                clear_masks(run.model)
            status = row.get("error", f"{time.perf_counter() - started:.1f}s")
            log(f"{request['id']} {name} keep={keep}: {status}")
            rows.append(row)
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
