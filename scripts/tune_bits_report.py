"""Searched bits per layer against a uniform quantization at the same bytes: ZipCache (keys before RoPE,
values Hadamard-rotated) within 0.22x an fp16 cache, query-agnostic, on the 4k suite at REPEAT_SAMPLES
samples per task, and its block in docs/RESULTS.md (issue 22).

Two searches: one at 0.22x by the tuner's count (the uniform scheme's own size, so the two compare at the
same bytes), and one at 0.205x, so that the bytes the bench measures after the answer (which also hold the
question's and the generated rows at full precision) stay within 0.22x.

    .venv/bin/python scripts/tune_bits_report.py --write                  # every stage (resumes), then publish
    .venv/bin/python scripts/tune_bits_report.py --stages tune            # the search alone
    .venv/bin/python scripts/tune_bits_report.py --stages '' --write      # publish what is on disk

Stages:
- ``tune``: for each byte target B the same search as ``kvsqueeze tune --model qwen2.5-coder-0.5b --method
  zipcache -p key_pre_rope=True -p value_hadamard=True --bytes B --out docs/bench/tune/zipcache-bytesB.json``
  (EvoPress over the salient set's key and value bits per layer, 2, 4 or 8; KL against the full cache on
  offline documents, never the benchmark's samples; resumable from its state file).
- ``bench``: the searched profiles on samples 0..REPEAT_SAMPLES-1 of every task, query-agnostic, fp32, into
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
from kvsqueeze.bench.report import paired_table, parse_stages, replace_block
from kvsqueeze.bench.runner import BenchConfig, MethodSpec, load_records, run_bench
from kvsqueeze.cli.main import main as cli
from kvsqueeze.tune.evolution import describe_search

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b"
TARGETS = (0.22, 0.205)  # x fp16 by the tuner's count
RECORDS = ROOT / "docs" / "bench" / "repeats"
COMMAND = ".venv/bin/python scripts/tune_bits_report.py --write"
STAGES = ("tune", "bench")


def tuned(target: float) -> Path:
    """Where the search at ``target`` x fp16 writes its profile."""
    return ROOT / "docs" / "bench" / "tune" / f"zipcache-bytes{target:g}.json"


def searched() -> list[MethodSpec]:
    """The searched profiles that exist."""
    return [MethodSpec("zipcache", ROTATED, profile=str(tuned(t))) for t in TARGETS if tuned(t).exists()]


def rows() -> list[MethodSpec]:
    """The uniform scheme the search starts from, KIVI at 4 bits, and the searched profiles that exist."""
    return [MethodSpec("zipcache", ROTATED), MethodSpec("kivi", {"bits": 4}), *searched()]


def config(methods: list[MethodSpec]) -> BenchConfig:
    """scripts/bench_report.py's repeated rows' config (query-agnostic, REPEAT_SAMPLES samples), with
    ``methods``: the same records, so the rows it published are read, not re-run."""
    return dataclasses.replace(repeat_config("query_agnostic"), methods=methods)


def search_lines(target: float) -> list[str]:
    """How the search at ``target`` went, from the profile's own record."""
    path = tuned(target)
    if not path.exists():
        return [f"_the search at {target:g}x has not run yet: `--stages tune`_", ""]
    profile = json.loads(path.read_text())
    search = profile["search"]
    return [
        f"`+{path.stem}` ({target:g}x fp16 by the tuner's count). {describe_search(profile)} Calibration KL "
        f"{search['kl']:.4f} at {search['stored_bytes']:.4f}x fp16 by the tuner's count against the uniform "
        f"start's {search['start_kl']:.4f} at {search['start_bytes']:.4f}x. Salient-set bits per layer, keys: "
        f"{profile['key_bits']}; values: {profile['value_bits']} (the start: keys {search['start_key_bits']}, "
        f"values {search['start_value_bits']}).",
        "",
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
    stages = parse_stages(args.stages, STAGES)
    params = [arg for name, value in ROTATED.items() for arg in ("-p", f"{name}={value}")]
    for target in TARGETS if "tune" in stages else ():
        if not tuned(target).exists():
            search = ["--model", MODEL, "--method", "zipcache", *params, "--bytes", f"{target:g}"]
            cli(["tune", *search, "--out", str(tuned(target))])
    if "bench" in stages and searched():
        model, tokenizer = kvsqueeze.load_model(MODEL)
        run_bench(model, tokenizer, config(searched()), RECORDS, model_name=MODEL)
    records = load_records(config(rows()), RECORDS)
    lines = [
        f"Model `{MODEL}` (fp32), 4096-token contexts, query-agnostic, samples 0 to {REPEAT_SAMPLES - 1} of "
        f"every task (seed 0, `pydocs` haystack). Command: `{COMMAND}` (resumable; records in "
        f"`{RECORDS.relative_to(ROOT)}`, shared with the quantization rows of the bench block; the profiles in "
        "`docs/bench/tune`). `+zipcache-bytesB` is `zipcache(key_pre_rope=True,value_hadamard=True)` with the "
        "searched bits of its salient set per layer (the least salient rows stay at 2 bits) within Bx an fp16 "
        "cache by the tuner's count (a 2048-token block quantized). `bytes / fp16` is measured from the cache's "
        "tensors after the answer: it also holds the question's and the generated rows, at full precision in "
        "the residual, so it reads above the tuner's count (each search's line gives the uniform start's size by "
        "that count).",
        "",
        *[line for target in TARGETS for line in search_lines(target)],
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
