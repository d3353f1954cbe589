"""Searched bits per layer against a uniform quantization at the same bytes: ZipCache (keys before RoPE,
values Hadamard-rotated) within 0.22x an fp16 cache, query-agnostic, on the 4k suite at REPEAT_SAMPLES
samples per task, and its block in docs/RESULTS.md (issue 22).

    .venv/bin/python scripts/tune_bits_report.py --write                  # every stage (resumes), then publish
    .venv/bin/python scripts/tune_bits_report.py --stages tune            # the search alone
    .venv/bin/python scripts/tune_bits_report.py --stages '' --write      # publish what is on disk

Stages:
- ``tune``: the same search as ``kvsqueeze tune --model qwen2.5-coder-0.5b --method zipcache -p key_pre_rope=True
  -p value_hadamard=True --bytes 0.22 --out docs/bench/tune/zipcache-bytes0.22.json`` (EvoPress over the
  salient set's key and value bits per layer, 2, 4 or 8; KL against the full cache on offline documents, never
  the benchmark's samples; resumable from its state file).
- ``bench``: the searched profile on samples 0..REPEAT_SAMPLES-1 of every task, query-agnostic, fp32, into
  docs/bench/repeats beside the records of the full cache, the uniform scheme it starts from and KIVI at 4
  bits that ``scripts/bench_report.py`` published there (same config, so a record is shared, not re-run).

Bytes are measured from the cache's tensors (``cache_bytes``), as a share of an fp16 cache of the same rows
(half the fp32 full cache's ``full_cache_bytes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from bench_report import REPEAT_SAMPLES, ROTATED, repeat_config  # the published repeated rows' config

import kvsqueeze
from kvsqueeze.bench.report import paired_table, replace_block
from kvsqueeze.bench.runner import BenchConfig, MethodSpec, load_records, run_bench
from kvsqueeze.cli.main import main as cli
from kvsqueeze.tune.evolution import describe_search

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b"
BYTES = 0.22
TUNED = ROOT / "docs" / "bench" / "tune" / f"zipcache-bytes{BYTES:g}.json"
RECORDS = ROOT / "docs" / "bench" / "repeats"
COMMAND = ".venv/bin/python scripts/tune_bits_report.py --write"
STAGES = ("tune", "bench")


def rows() -> list[MethodSpec]:
    """The uniform scheme the search starts from, KIVI at 4 bits, and the searched profile once it exists."""
    uniform = [MethodSpec("zipcache", ROTATED), MethodSpec("kivi", {"bits": 4})]
    return uniform + ([MethodSpec("zipcache", ROTATED, profile=str(TUNED))] if TUNED.exists() else [])


def config(methods: list[MethodSpec]) -> BenchConfig:
    """scripts/bench_report.py's repeated rows' config (query-agnostic, REPEAT_SAMPLES samples), with
    ``methods``: the same records, so the rows it published are read, not re-run."""
    return dataclasses.replace(repeat_config("query_agnostic"), methods=methods)


def search_lines() -> list[str]:
    """How the search went, from the profile's own record."""
    if not TUNED.exists():
        return ["_the search has not run yet: `--stages tune`_"]
    profile = json.loads(TUNED.read_text())
    search = profile["search"]
    return [
        f"{describe_search(profile)} Calibration KL {search['kl']:.4f} at {search['stored_bytes']:.4f}x fp16 "
        f"by the tuner's count against the uniform start's {search['start_kl']:.4f} at "
        f"{search['start_bytes']:.4f}x.",
        "",
        f"Salient-set bits per layer, keys: {profile['key_bits']}; values: {profile['value_bits']} (the start: "
        f"keys {search['start_key_bits']}, values {search['start_value_bits']}).",
    ]


def summary(records: list[dict]) -> list[str]:
    """Average score and measured bytes per row, over the samples every row holds."""
    lines = ["| row | avg score | bytes / fp16 (measured) | KL |", "| --- | ---: | ---: | ---: |"]
    by_row: dict[str, list[dict]] = {}
    for record in records:
        by_row.setdefault(record["method"], []).append(record)
    for label, held in by_row.items():
        scores = [s["score"] for r in held for s in r["samples"]]
        stored = sum(r["cache_bytes"] for r in held) / sum(r["full_cache_bytes"] / 2 for r in held)
        kl = sum(r["kl"] for r in held) / len(held)
        lines.append(f"| `{label}` | {100 * sum(scores) / len(scores):.1f} | {stored:.3f} | {kl:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="replace the tune_bits block in docs/RESULTS.md")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        raise SystemExit(f"unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(STAGES)}")
    if "tune" in stages and not TUNED.exists():
        params = [arg for name, value in ROTATED.items() for arg in ("-p", f"{name}={value}")]
        cli(
            [
                "tune",
                "--model",
                MODEL,
                "--method",
                "zipcache",
                *params,
                "--bytes",
                f"{BYTES:g}",
                "--out",
                str(TUNED),
            ]
        )
    if "bench" in stages and TUNED.exists():
        model, tokenizer = kvsqueeze.load_model(MODEL)
        run_bench(model, tokenizer, config(rows()[-1:]), RECORDS, model_name=MODEL)
    records = load_records(config(rows()), RECORDS)
    lines = [
        f"Model `{MODEL}` (fp32), 4096-token contexts, query-agnostic, samples 0 to {REPEAT_SAMPLES - 1} of "
        f"every task (seed 0, `pydocs` haystack). Command: `{COMMAND}` (resumable; records in "
        f"`{RECORDS.relative_to(ROOT)}`, shared with the quantization rows of the bench block; the profile in "
        f"`{TUNED.relative_to(ROOT)}`). `+zipcache-bytes{BYTES:g}` is "
        f"`zipcache(key_pre_rope=True,value_hadamard=True)` with the searched bits of its salient set per layer "
        f"(the least salient rows stay at 2 bits) within {BYTES:g}x an fp16 cache by the tuner's count (a "
        "2048-token block quantized). `bytes / fp16` is measured from the cache's tensors after the answer: it "
        "also holds the question's and the generated rows, at full precision in the residual.",
        "",
        *search_lines(),
        "",
        *summary(records),
        "",
        "Sample by sample against the full cache (same samples):",
        "",
        paired_table(records),
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "tune_bits", body)


if __name__ == "__main__":
    main()
