"""bfloat16 against float32 on this CPU: prefill and decode speed, and whether the full cache's scores hold.

    .venv/bin/python scripts/dtype_report.py            # print the block
    .venv/bin/python scripts/dtype_report.py --write    # and replace its block in docs/RESULTS.md

1. Speed: one model loaded in each dtype; a 4k-token prefill and 32 greedy decode steps after it, the two
   dtypes interleaved ``--repeats`` times in one run (timings here are noisy; the ratio is the figure).
2. Scores: the full cache on sample 0 of every 4k task in bfloat16 (records in docs/bench/bf16), beside
   the float32 records of the same samples (docs/bench/repeats), sample by sample.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze.bench import TASKS, generate_samples
from kvsqueeze.bench.report import replace_block
from kvsqueeze.bench.runner import BenchConfig, MethodSpec, load_records, run_bench

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b"
LENGTH = 4096
COMMAND = ".venv/bin/python scripts/dtype_report.py --write"
DTYPES = (torch.float32, torch.bfloat16)


@torch.inference_mode()
def time_once(model, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds of the prefill of ``ids`` (1, T), and seconds per decode step after it."""
    cache = kvsqueeze.SqueezeCache(model, "full")
    start = time.perf_counter()
    out = model(ids, cache=cache, logits_to_keep=1)
    prefill = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - start) / steps


def speed_lines(repeats: int, steps: int) -> list[str]:
    models = {dtype: kvsqueeze.load_model(MODEL, dtype=dtype, progress=False) for dtype in DTYPES}
    tokenizer = models[torch.float32][1]
    sample = generate_samples("niah_single_number", tokenizer, length=LENGTH, num_samples=1, seed=0)[0]
    ids = tokenizer(sample.context + "\n" + sample.question, return_tensors="pt")["input_ids"]
    for model, _ in models.values():  # warm-up: one short pass each
        time_once(model, ids[:, :64], 2)
    times: dict[torch.dtype, list[tuple[float, float]]] = {dtype: [] for dtype in DTYPES}
    for _ in range(repeats):
        for dtype, (model, _) in models.items():
            times[dtype].append(time_once(model, ids, steps))
    median = {d: tuple(statistics.median(t[i] for t in times[d]) for i in (0, 1)) for d in DTYPES}
    fp32, bf16 = median[torch.float32], median[torch.bfloat16]
    return [
        f"Prefill of {ids.shape[1]} tokens and {steps} decode steps after it, full cache, median of "
        f"{repeats} interleaved runs:",
        "",
        "| dtype | prefill s | decode ms / token | prefill speed-up | decode speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {str(d).replace('torch.', '')} | {median[d][0]:.1f} | {1000 * median[d][1]:.0f} | "
            f"{fp32[0] / median[d][0]:.2f}x | {fp32[1] / median[d][1]:.2f}x |"
            for d in DTYPES
        ),
        "",
        f"bfloat16 is {fp32[0] / bf16[0]:.2f}x float32's prefill speed and {fp32[1] / bf16[1]:.2f}x its "
        "decode speed.",
    ]


def config() -> BenchConfig:
    return BenchConfig(
        methods=[MethodSpec("full")],
        budgets=[1.0],
        tasks=sorted(TASKS),
        lengths=[LENGTH],
        num_samples=1,
        settings=["query_agnostic"],
        fidelity_tokens=64,
    )


def score_lines() -> list[str]:
    model, tokenizer = kvsqueeze.load_model(MODEL, dtype=torch.bfloat16, progress=False)
    bf16 = run_bench(model, tokenizer, config(), ROOT / "docs" / "bench" / "bf16", model_name=MODEL)
    fp32 = load_records(config(), ROOT / "docs" / "bench" / "repeats")
    by_task = {r["task"]: r["score"] for r in fp32}
    lines = [
        f"Full cache, sample 0 of every task at {LENGTH} tokens (query-agnostic), greedy answers:",
        "",
        "| task | float32 | bfloat16 |",
        "| --- | ---: | ---: |",
    ]
    for r in sorted(bf16, key=lambda r: r["task"]):
        lines.append(
            f"| {r['task']} | {100 * by_task.get(r['task'], float('nan')):.0f} | {100 * r['score']:.0f} |"
        )
    mean32 = statistics.mean(by_task[r["task"]] for r in bf16 if r["task"] in by_task)
    mean16 = statistics.mean(r["score"] for r in bf16)
    lines.append(f"| avg | {100 * mean32:.0f} | {100 * mean16:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="replace the dtype block in docs/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs per dtype")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timing run")
    args = parser.parse_args()
    lines = [
        f"Model `{MODEL}`, {torch.get_num_threads()} CPU thread(s) (this CPU has AVX512-BF16). Command: "
        f"`{COMMAND}`. Attention runs in float32 on the CPU for a bfloat16 model "
        "(`kvsqueeze/attention/sdpa.py`: PyTorch's half-precision CPU SDPA is the slow part).",
        "",
        *speed_lines(args.repeats, args.steps),
        "",
        *score_lines(),
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "dtype", body)


if __name__ == "__main__":
    main()
