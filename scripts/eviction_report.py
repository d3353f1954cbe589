"""Measure the adaptive-eviction figures on Qwen2.5-Coder-0.5B at 4k tokens and write them into docs/RESULTS.md.

    .venv/bin/python scripts/eviction_report.py            # print the tables
    .venv/bin/python scripts/eviction_report.py --write    # and replace the eviction block in docs/RESULTS.md

1. CAKE's cascading prefill: the most bytes the cache held while a 4k prompt was prefilled at r = 0.2,
   cascading vs planning once at the last layer, against the full cache.
2. The mass allocator's effective ratio (rows kept / rows of a full cache) per prompt at p = 0.9 and 0.95,
   uncapped (budget 1.0).
3. Ada-KV at r = 0.25 and 0.1: stored bytes against the full cache, and how unequal the heads are.

Prompts: the benchmark's generated 4k samples (seed 0) of three tasks, context only (query-agnostic).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze import SqueezeCache
from kvsqueeze.bench import generate_samples
from kvsqueeze.bench.prompts import encode_sample
from kvsqueeze.bench.report import replace_block

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b"
TASKS = ("qa_generated", "niah_multikey", "variable_tracking")
COMMAND = ".venv/bin/python scripts/eviction_report.py --write"


def prompts(tokenizer, length: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    for task in TASKS:
        sample = generate_samples(task, tokenizer, length=length, num_samples=1, seed=0)[0]
        out.append((task, encode_sample(tokenizer, sample).compressed_ids))
    return out


@torch.inference_mode()
def cake_peak(model, ids: torch.Tensor) -> str:
    full = SqueezeCache(model, "full")
    model(ids, cache=full, logits_to_keep=1)
    rows = [
        "| prefill | peak cache bytes | peak / full | kept after prefill / full |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, cascade in (("CAKE, cascading", True), ("CAKE, planned once at the last layer", False)):
        cache = SqueezeCache(model, "cake", 0.2, cascade=cascade)
        model(ids, cache=cache, logits_to_keep=1)
        rows.append(
            f"| {label} | {cache.peak_nbytes() / 2**20:.1f} MiB | {cache.peak_nbytes() / full.nbytes():.3f} | "
            f"{cache.nbytes() / full.nbytes():.3f} |"
        )
    rows.append(f"| full cache | {full.nbytes() / 2**20:.1f} MiB | 1.000 | 1.000 |")
    return "\n".join(rows)


@torch.inference_mode()
def mass_and_adakv(model, samples: list[tuple[str, torch.Tensor]]) -> tuple[str, str]:
    mass = ["| prompt | tokens | p = 0.9 | p = 0.95 |", "| --- | ---: | ---: | ---: |"]
    ada = [
        "| prompt | ratio | stored / full | rows per head, min-max over (layer, head) |",
        "| --- | ---: | ---: | --- |",
    ]
    for task, ids in samples:
        source = SqueezeCache(model, "full", record_prefill=True)
        model(ids, cache=source, logits_to_keep=1)
        ratios = [float(source.fork("mass", 1.0, p=p).kept_ratio()[0]) for p in (0.9, 0.95)]
        mass.append(f"| {task} | {ids.shape[1]} | {ratios[0]:.3f} | {ratios[1]:.3f} |")
        for r in (0.25, 0.1):
            cache = source.fork("adakv", r)
            rows = cache.stored_rows()[:, 0]  # (N, H_kv)
            ada.append(
                f"| {task} | {r:g} | {cache.nbytes() / source.nbytes():.3f} | "
                f"{int(rows.min())}-{int(rows.max())} (uniform: {int(torch.tensor(ids.shape[1] * r).ceil())}) |"
            )
    return "\n".join(mass), "\n".join(ada)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="replace the eviction block in docs/RESULTS.md")
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = kvsqueeze.load_model(MODEL)
    samples = prompts(tokenizer, args.length)
    peak = cake_peak(model, samples[0][1])
    mass, ada = mass_and_adakv(model, samples)
    body = "\n".join(
        [
            f"Model `{MODEL}` (fp32), {args.length}-token contexts of the benchmark's generated tasks (seed 0). "
            f"Command: `{COMMAND}`.",
            "",
            f"**CAKE: cache bytes while prefilling at r = 0.2** ({samples[0][0]}, {samples[0][1].shape[1]} tokens)",
            "",
            peak,
            "",
            "**Mass allocator: effective ratio reached, uncapped** (rows kept / rows of the full cache)",
            "",
            mass,
            "",
            "**Ada-KV: stored bytes with unequal heads**",
            "",
            ada,
            "",
            f"Wall time of this report: {time.perf_counter() - started:.0f} s.",
        ]
    )
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "eviction", body)


if __name__ == "__main__":
    main()
