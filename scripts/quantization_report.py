"""Measure KV quantization on Qwen2.5-Coder-0.5B at 4k tokens and write it into docs/RESULTS.md.

    .venv/bin/python scripts/quantization_report.py            # print the tables
    .venv/bin/python scripts/quantization_report.py --write    # and replace the quantization block

One run, one process, one prompt (the benchmark's 4k ``qa_generated`` sample, seed 0, query-agnostic):

1. Bytes per token per KV head of each scheme after the prompt, measured from the stored tensors (codes,
   parameters and any full-precision residual), against fp16 (``4 * D`` bytes) and the fp32 cache the
   model runs with here. Also the schemes on a random (4096, 64) block, where nothing depends on the model.
2. Decode at 4k: the full cache's 64-token greedy continuation is fed to every cache one token at a time;
   the decode tokens/s (one over the median step time, against the full cache's in the same run) and
   KL(full || cache) and top-1 agreement of the next-token distributions over those steps.

3. Task scores at 4k: transformers' ``QuantizedCache`` answers every benchmark task (the benchmark's own
   samples, query-agnostic prompts, answer lengths and scoring), beside the ZipCache and KIVI rows of the
   benchmark's run records (``scripts/bench_report.py``, ``docs/bench/runs``), and the benchmark's repeated
   rows (``REPEATED`` there) beside the full cache at more samples per task (``docs/bench/repeats``).

transformers' own ``QuantizedCache`` (quanto backend) is measured beside ours when ``optimum-quanto`` is
installed (``pip install optimum-quanto==0.2.7``; its first use compiles a C++ extension, minutes here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from bench_report import (  # the benchmark's quantization rows (scripts/bench_report.py)
    DEMO_SPLIT,
    QUANTIZED,
    REFERENCE,
    REPEAT_SAMPLES,
    REPEATED,
    ROTATED,
)

import kvsqueeze
from kvsqueeze import SqueezeCache
from kvsqueeze.bench import TASKS, generate_samples, postprocess, score_sample
from kvsqueeze.bench.prompts import encode_sample
from kvsqueeze.bench.report import mean_of, replace_block
from kvsqueeze.bench.runner import MethodSpec, greedy, run_path, stop_ids
from kvsqueeze.quantization import (
    KIVI_2,
    KIVI_4,
    ZIPCACHE,
    ZIPCACHE_REFERENCE,
    bytes_per_token,
    fp16_bytes_per_token,
)
from kvsqueeze.text_config import head_dim_of

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b"
TASK = "qa_generated"
COMMAND = ".venv/bin/python scripts/quantization_report.py --write"
DECODE_TOKENS = 64
HF_BITS = (4, 2)
BENCH_OUT = ROOT / "docs" / "bench"
OURS = (
    ("full", {}),
    ("zipcache", {}),
    ("zipcache", {"key_pre_rope": True}),
    ("zipcache", ROTATED),
    ("zipcache", DEMO_SPLIT),
    ("zipcache", REFERENCE),
    ("kivi", {}),
    ("kivi", {"bits": 4}),
    ("snapkv+zipcache", {}),
)


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes of a tensor, or of the inner tensors of a quanto tensor subclass."""
    if tensor is None:
        return 0
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def hf_quantized_bytes(cache) -> int:
    """Stored bytes of a transformers ``QuantizedCache``: its quantized tensors plus its fp residual."""
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


def caches(model):
    """(label, a fresh cache factory, bytes-of-the-cache) for every cache measured."""
    out = []
    for name, params in OURS:
        budget = 0.25 if "+" in name else 1.0
        label = MethodSpec(name, params).label + (f" @{budget:g}" if budget < 1 else "")
        out.append(
            (
                label,
                lambda n=name, p=params, b=budget: SqueezeCache(model, n, b, **p),
                lambda c: c.kv_nbytes(),
            )
        )
    if importlib.util.find_spec("optimum.quanto") is not None:
        for bits in HF_BITS:
            out.append(
                (
                    f"transformers QuantizedCache quanto {bits}-bit",
                    lambda b=bits: hf_quantized_cache(model, b),
                    hf_quantized_bytes,
                )
            )
    return out


@torch.inference_mode()
def measure(model, ids: torch.Tensor) -> list[dict]:
    text = model.config.get_text_config(decoder=True)
    head_dim = head_dim_of(text)
    slots = text.num_hidden_layers * text.num_key_value_heads * ids.shape[1]  # (layer, head, token) rows
    rows, teacher, reference = [], None, None
    for label, make, nbytes in caches(model):
        cache = make()
        start = time.perf_counter()
        out = model(ids, cache=cache, logits_to_keep=1)
        prefill = time.perf_counter() - start
        stored = nbytes(cache)
        # decode: the full cache's greedy continuation, fed one token at a time (teacher forcing)
        steps = [out.logits[0, -1].float().log_softmax(-1)]
        fed = teacher or [int(steps[0].argmax())]
        seconds = []  # per decode step: the median is robust to a burst of load on a shared machine
        for i in range(DECODE_TOKENS - 1):
            start = time.perf_counter()
            logits = model(torch.tensor([[fed[i]]]), cache=cache).logits[0, -1]
            seconds.append(time.perf_counter() - start)
            steps.append(logits.float().log_softmax(-1))
            if teacher is None:
                fed.append(int(steps[-1].argmax()))
        rate = 1 / statistics.median(seconds)
        logprobs = torch.stack(steps)  # (DECODE_TOKENS, V)
        if teacher is None:
            teacher, reference = fed, logprobs
        kl = (reference.exp() * (reference - logprobs)).sum(-1).clamp(min=0).mean()
        top1 = (reference.argmax(-1) == logprobs.argmax(-1)).float().mean()
        per_token = stored / slots
        rows.append(
            {
                "label": label,
                "bytes_per_token": per_token,
                "vs_fp16": per_token / fp16_bytes_per_token(head_dim),
                "prefill_tps": ids.shape[1] / prefill,
                "decode_tps": rate,
                "kl": float(kl),
                "top1": float(top1),
            }
        )
        print(rows[-1], flush=True)
        del cache
    return rows


def hf_quantized_cache(model, bits: int):
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=model.config, nbits=bits)


@torch.inference_mode()
def hf_task_scores(model, tokenizer, length: int) -> dict[str, dict[str, float]]:
    """{row label: {task: score}} of transformers' QuantizedCache at each of HF_BITS on every task."""
    from tqdm.auto import tqdm

    eos = stop_ids(model, tokenizer)
    scores: dict[str, dict[str, float]] = {}
    for task in tqdm(sorted(TASKS), desc="QuantizedCache on the tasks", unit="task"):
        sample = generate_samples(task, tokenizer, length=length, num_samples=1, seed=0)[0]
        encoded = encode_sample(tokenizer, sample, "query_agnostic")
        for bits in HF_BITS:
            cache = hf_quantized_cache(model, bits)
            model(encoded.compressed_ids, cache=cache, logits_to_keep=1)
            tokens, _ = greedy(model, cache, encoded.followup_ids, TASKS[task].answer_tokens, eos)
            answer = postprocess(tokenizer.decode(tokens, skip_special_tokens=True), sample.answer_prefix)
            scores.setdefault(f"transformers QuantizedCache quanto {bits}-bit", {})[task] = score_sample(
                sample, answer
            )
    return scores


def bench_task_scores(
    length: int, rows: tuple[tuple[str, dict], ...] = QUANTIZED, out: Path = BENCH_OUT
) -> dict[str, dict[str, float]]:
    """{label: {task: score}} of the full cache and the (name, params) ``rows`` from the benchmark's run
    records under ``out``, read by the labels they have there (missing runs left out)."""
    scores: dict[str, dict[str, float]] = {}
    for method in ("full", *(MethodSpec(name, params).label for name, params in rows)):
        for task in sorted(TASKS):
            path = run_path(out, "query_agnostic", task, length, method, 1.0)
            if path.exists():
                scores.setdefault(method, {})[task] = json.loads(path.read_text())["score"]
    return scores


def render_tasks(scores: dict[str, dict[str, float]], intro: str) -> str:
    tasks = sorted(TASKS)
    lines = [
        intro,
        "",
        "| cache | " + " | ".join(tasks) + " | avg | tasks |",
        "| --- |" + " ---: |" * (len(tasks) + 2),
    ]
    for label, by_task in scores.items():
        cells = [f"{100 * by_task[t]:.0f}" if t in by_task else "-" for t in tasks]
        average = 100 * mean_of(by_task.values())
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {average:.0f} | {len(by_task)} |")
    return "\n".join(lines)


def render(rows: list[dict], tokens: int, head_dim: int) -> str:
    full = next(r for r in rows if r["label"] == "full")
    lines = [
        f"Model `{MODEL}` (fp32 weights and cache, 2 CPU threads), the benchmark's {tokens}-token "
        f"`{TASK}` prompt (seed 0), head dim {head_dim}. Command: `{COMMAND}`.",
        "",
        "Bytes per token per KV head are the stored keys and values after the prompt (codes, parameters and "
        "any full-precision residual), from the tensors; fp16 is `4 * D` bytes. Decode: the full cache's "
        f"{DECODE_TOKENS}-token greedy continuation fed one token at a time to every cache (teacher forcing), "
        "timed (tokens/s = one over the median step time), with KL(full || cache) and top-1 agreement of "
        "the next-token distributions over those steps; speed ratios are against the full cache in this "
        "same run. `snapkv+zipcache` keeps 25% of the tokens, then quantizes them.",
        "",
        "| cache | bytes / token / head | vs fp16 | KL | top-1 | prefill tok/s | decode tok/s | decode vs full |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['bytes_per_token']:.1f} | {r['vs_fp16']:.3f} | {r['kl']:.3f} | "
            f"{100 * r['top1']:.0f}% | {r['prefill_tps']:.0f} | "
            f"{r['decode_tps']:.2f} | {r['decode_tps'] / full['decode_tps']:.2f}x |"
        )
    lines += [
        "",
        "The same schemes on a random (4096 tokens, D = 64) block, codes and parameters only "
        "(`kvsqueeze.quantization.bytes_per_token`):",
        "",
        "| scheme | bytes / token / head | vs fp16 |",
        "| --- | ---: | ---: |",
    ]
    for scheme in (KIVI_2, KIVI_4, ZIPCACHE_REFERENCE, ZIPCACHE):
        b = bytes_per_token(scheme, 4096, 64)
        lines.append(f"| {scheme.name} | {b:.1f} | {b / fp16_bytes_per_token(64):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the quantization block in docs/RESULTS.md"
    )
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = kvsqueeze.load_model(MODEL)
    sample = generate_samples(TASK, tokenizer, length=args.length, num_samples=1, seed=0)[0]
    ids = encode_sample(tokenizer, sample).compressed_ids
    text = model.config.get_text_config(decoder=True)
    head_dim = head_dim_of(text)
    body = render(measure(model, ids), ids.shape[1], head_dim)
    scores = bench_task_scores(args.length)
    if importlib.util.find_spec("optimum.quanto") is not None:
        scores |= hf_task_scores(model, tokenizer, args.length)
    body += "\n\n" + render_tasks(
        scores,
        f"**Task scores at {args.length} tokens** (%, query-agnostic, 1 sample per task, seed 0). The "
        "`full`, `zipcache` and `kivi` rows are the benchmark's run records (`key_low_ratio=0.4,"
        "low_key_group=None,value_low_ratio=0.4` is the reference's ZipCache scheme; `.venv/bin/python "
        "scripts/bench_report.py --write`); the QuantizedCache rows are measured by this report on the "
        "same prompts with transformers' defaults (quanto backend, group size 64, 128-token fp residual).",
    )
    body += "\n\n" + render_tasks(
        bench_task_scores(args.length, REPEATED, BENCH_OUT / "repeats"),
        f"The same at {REPEAT_SAMPLES} samples per task (samples 0 to {REPEAT_SAMPLES - 1}, each score "
        "the mean over them): the benchmark's `repeats` run records (`docs/bench/repeats`).",
    )
    body += f"\n\nWall time of this report: {time.perf_counter() - started:.0f} s."
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "quantization", body)


if __name__ == "__main__":
    main()
