"""A searched layer profile against the rule-based allocators: SnapKV at keep 0.1, query-aware, on the 4k
suite at REPEAT_SAMPLES samples per task, and write its block in docs/RESULTS.md (issue 22).

    .venv/bin/python scripts/tune_report.py --write                  # every stage (resumes), then publish
    .venv/bin/python scripts/tune_report.py --stages tune            # the search alone
    .venv/bin/python scripts/tune_report.py --stages '' --write      # publish what is on disk

Stages:
- ``tune``: ``kvsqueeze tune`` with its defaults (EvoPress over per-layer keep ratios, KL against the full
  cache on offline documents, never the benchmark's samples) into docs/bench/tune/snapkv-0.1.json; its state
  file makes it resumable. It is the same search as
  ``kvsqueeze tune --model qwen2.5-coder-0.5b --method snapkv --budget 0.1 --out docs/bench/tune/snapkv-0.1.json``.
- ``profile``: PrefixKV's offline profile at 0.1 (``kvsqueeze profile``, its generated calibration prompts,
  seed 1) into docs/bench/tune/prefixkv-0.1.json.
- ``bench``: every row at the same bytes (keep 0.1) and the full cache on samples 0..REPEAT_SAMPLES-1 of every
  task, query-aware, in bfloat16 (2.35x float32's prefill and 1.70x its decode here, with the full cache's
  scores held: the dtype block of docs/RESULTS.md); records in docs/bench/tune/bfloat16, rewritten after
  every sample, so it resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze.bench import TASKS
from kvsqueeze.bench.report import markdown_table, paired_table, parse_stages, replace_block
from kvsqueeze.bench.runner import BenchConfig, MethodSpec, load_records, run_bench
from kvsqueeze.cli.main import main as cli
from kvsqueeze.tune.evolution import describe_search

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b"
BUDGET = 0.1
REPEAT_SAMPLES = 3
PROFILES = ROOT / "docs" / "bench" / "tune"
TUNED = PROFILES / f"snapkv-{BUDGET:g}.json"
PREFIXKV = PROFILES / f"prefixkv-{BUDGET:g}.json"
DTYPE = torch.bfloat16
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
RECORDS = PROFILES / DTYPE_NAME
COMMAND = ".venv/bin/python scripts/tune_report.py --write"
STAGES = ("tune", "profile", "bench")


def rows() -> list[MethodSpec]:
    """SnapKV's scores under each allocator: uniform, the pyramid, CAKE, D2O, PrefixKV's profile, tuned
    (a profile row once its file exists)."""
    rules = [MethodSpec(name) for name in ("snapkv", "pyramidkv", "cake", "d2o")]
    return rules + [MethodSpec("snapkv", profile=str(p)) for p in (PREFIXKV, TUNED) if p.exists()]


def config() -> BenchConfig:
    return BenchConfig(
        methods=rows(),
        budgets=[BUDGET],
        tasks=sorted(TASKS),
        lengths=[4096],
        num_samples=REPEAT_SAMPLES,
        seed=0,
        haystack="pydocs",
        settings=["query_aware"],
        fidelity_tokens=64,
    )


def search_lines() -> list[str]:
    """How the search went, from the tuned profile's own record."""
    if not TUNED.exists():
        return ["_the search has not run yet: `--stages tune`_"]
    profile = json.loads(TUNED.read_text())
    search = profile["search"]
    ratios = ", ".join(f"{r:.3f}" for r in profile["keep_ratios"])
    return [
        f"{describe_search(profile)} Calibration KL {search['kl']:.4f} against the uniform start's "
        f"{search['uniform_kl']:.4f}.",
        "",
        f"Keep ratio per layer (mean {sum(profile['keep_ratios']) / len(profile['keep_ratios']):.3f}): {ratios}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="replace the tune block in docs/RESULTS.md")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    args = parser.parse_args()
    stages = parse_stages(args.stages, STAGES)
    PROFILES.mkdir(parents=True, exist_ok=True)
    if "tune" in stages and not TUNED.exists():
        cli(["tune", "--model", MODEL, "--method", "snapkv", "--budget", f"{BUDGET:g}", "--out", str(TUNED)])
    if "profile" in stages and not PREFIXKV.exists():
        cli(
            [
                "profile",
                "--model",
                MODEL,
                "--method",
                "prefixkv",
                "--budget",
                f"{BUDGET:g}",
                "--out",
                str(PREFIXKV),
            ]
        )
    if "bench" in stages:
        model, tokenizer = kvsqueeze.load_model(MODEL, dtype=DTYPE)
        run_bench(model, tokenizer, config(), RECORDS, model_name=MODEL)
    records = load_records(config(), RECORDS)
    labels = ", ".join(f"`{spec.label}`" for spec in rows())
    lines = [
        f"Model `{MODEL}` ({DTYPE_NAME}, {torch.get_num_threads()} CPU thread(s)), 4096-token contexts, "
        f"query-aware, keep {BUDGET:g} for every row (the same "
        f"bytes), samples 0 to {REPEAT_SAMPLES - 1} of every task asked for (seed 0, `pydocs` haystack). "
        f"Command: `{COMMAND}` (resumable; records in `{RECORDS.relative_to(ROOT)}`, profiles in "
        "`docs/bench/tune`).",
        "",
        f"Rows: {labels}. `+snapkv-0.1` is SnapKV with the searched profile, `+prefixkv-0.1` with PrefixKV's "
        "measured one; pyramidkv, cake and d2o are their own allocators (with their own scores).",
        "",
        *search_lines(),
    ]
    if any(r["method"] != "full" for r in records):
        counts = sorted({int(r["num_samples"]) for r in records if r["method"] != "full"})
        lines += [
            "",
            f"Samples per task in these rows: {', '.join(map(str, counts))}.",
            "",
            markdown_table(records, "query_aware"),
            "",
            "Sample by sample against the full cache (same samples):",
            "",
            paired_table(records),
            "",
            "Sample by sample against the searched profile (a negative difference: the row scores below it):",
            "",
            paired_table(records, baseline=f"{MethodSpec('snapkv', profile=str(TUNED)).label} @ {BUDGET:g}"),
        ]
    else:
        lines += ["", "_the benchmark has not run yet: `--stages bench`_"]
    body = "\n".join(lines)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "tune", body)


if __name__ == "__main__":
    main()
