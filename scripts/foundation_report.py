"""Measure the foundation's figures on the packaged SmolLM2 and write them into docs/RESULTS.md.

    .venv/bin/python scripts/foundation_report.py            # print the tables
    .venv/bin/python scripts/foundation_report.py --write    # and replace their block in docs/RESULTS.md

1. Memory: bytes each method's cache holds right after a 2k-token prompt at ratio 0.25, measured from the
   tensors, against a stock DynamicCache filled by the same prompt.
2. Decode speed: tokens/s of greedy decoding after a 4k-token prompt, full cache vs h2o at ratio 0.1,
   interleaved in one run (timings here are noisy; the ratio is the figure).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze.bench import generate_samples
from kvsqueeze.bench.report import replace_block
from kvsqueeze.generation import format_bytes

ROOT = Path(__file__).resolve().parent.parent


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """A natural-text long-context prompt of about ``length`` tokens (a needle task from kvsqueeze.bench)."""
    sample = generate_samples("niah_single_number", tokenizer, length=length, num_samples=1, seed=0)[0]
    return tokenizer(sample.context + "\n" + sample.question, return_tensors="pt")["input_ids"]


def dynamic_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.inference_mode()
def memory_table(model, tokenizer, ratio: float = 0.25, length: int = 2048) -> str:
    ids = prompt_ids(tokenizer, length)
    stock = DynamicCache(config=model.config)
    model(ids, cache=stock, logits_to_keep=1)
    full = dynamic_bytes(stock)
    lines = [
        f"Prompt: {ids.shape[1]} tokens; stock DynamicCache after prefill: {format_bytes(full)}.",
        "",
        "| method | stored bytes | stored / full | keys+values / full |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in sorted(kvsqueeze.METHODS):
        cache = kvsqueeze.SqueezeCache(model, name, budget=1.0 if name == "full" else ratio)
        model(ids, cache=cache, logits_to_keep=1)
        lines.append(
            f"| {name} | {format_bytes(cache.nbytes())} | {cache.nbytes() / full:.3f} | {cache.kv_nbytes() / full:.3f} |"
        )
    return "\n".join(lines)


@torch.inference_mode()
def decode_rate(model, ids: torch.Tensor, method: str, budget: float, steps: int) -> float:
    """Greedy decode tokens/s after prefilling ``ids`` (prefill excluded from the timing)."""
    cache = kvsqueeze.SqueezeCache(model, method, budget=budget)
    out = model(ids, cache=cache, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, cache=cache)
        token = out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - start)


def speed_table(model, tokenizer, length: int = 4096, steps: int = 64, rounds: int = 3) -> str:
    ids = prompt_ids(tokenizer, length)
    rates: dict[str, list[float]] = {"full": [], "h2o": []}
    for _ in range(rounds):  # interleaved, so drifts of the machine hit both
        rates["full"].append(decode_rate(model, ids, "full", 1.0, steps))
        rates["h2o"].append(decode_rate(model, ids, "h2o", 0.1, steps))
    full, h2o = statistics.median(rates["full"]), statistics.median(rates["h2o"])
    return "\n".join(
        [
            f"Prompt: {ids.shape[1]} tokens, {steps} greedy decode steps, median of {rounds} interleaved rounds, "
            f"{torch.get_num_threads()} threads.",
            "",
            "| cache | decode tokens/s | vs full |",
            "| --- | ---: | ---: |",
            f"| full | {full:.1f} | 1.00x |",
            f"| h2o @ 0.1 | {h2o:.1f} | {h2o / full:.2f}x |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the foundation block in docs/RESULTS.md"
    )
    parser.add_argument("--model", default=kvsqueeze.DEFAULT_MODEL)
    args = parser.parse_args()
    model, tokenizer = kvsqueeze.load_model(args.model)
    started = time.perf_counter()
    body = "\n".join(
        [
            f"Model `{args.model}` ({model.dtype}), {platform.machine()} CPU. "
            "Command: `.venv/bin/python scripts/foundation_report.py --write`.",
            "",
            "**Memory at ratio 0.25 (2k-token prompt)**",
            "",
            memory_table(model, tokenizer),
            "",
            "**Decode speed, full vs h2o at ratio 0.1 (4k-token prompt)**",
            "",
            speed_table(model, tokenizer),
            "",
            f"Wall time of this report: {time.perf_counter() - started:.0f} s.",
        ]
    )
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "foundation", body)


if __name__ == "__main__":
    main()
