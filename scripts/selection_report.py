"""Query-aware selection (Quest, MPCache) on the 4k suite, query-agnostic, beside the eviction methods, the
query-agnostic scorers and kvpress, and write its block in docs/RESULTS.md.

    .venv/bin/python scripts/selection_report.py --samples 1           # run (resumes), print the block
    .venv/bin/python scripts/selection_report.py --samples 1 --write   # ... and publish it
    .venv/bin/python scripts/selection_report.py --stages '' --write   # publish what is on disk

Qwen2.5-Coder-0.5B at 4096 tokens, seed 0, ``pydocs`` haystack, the question after compression. A budget of
0.1 or 0.25 is ``ceil(r * prompt)`` tokens, read as every method reads it: the rows an eviction method keeps,
and the rows a selecting method's decode step attends to (Quest keeps every row; MPCache keeps
``static_keep = 0.5`` of the prompt and attends to the budget). The quest and mpcache records go to
docs/bench/repeats beside the full cache, kvzip and kvzap (3 samples there); the eviction methods' records
are the published grid's (docs/bench/runs, sample 0) and kvpress's are docs/bench/kvpress (sample 0). Every
row of the block is read on the samples all its rows share (sample 0 when any row holds one), so the rows
compare on the same samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kvsqueeze
from kvsqueeze.bench import TASKS
from kvsqueeze.bench.report import markdown_table, mean_of, paired_table, replace_block, split_labels
from kvsqueeze.bench.runner import (
    BenchConfig,
    MethodSpec,
    SampleOutcome,
    _statistics,
    load_records,
    run_bench,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-coder-0.5b"
LENGTH = 4096
BUDGETS = (0.1, 0.25)
SELECTING = (
    MethodSpec("quest"),
    MethodSpec("quest", {"group": "max"}),
    MethodSpec("quest", {"page_size": 8}),
    MethodSpec("quest", {"page_size": 4}),
    MethodSpec("quest", {"page_size": 4, "bounds_dtype": "float32"}),  # run when fp32 was the default
    MethodSpec("mpcache"),
)
SELECTING_LABELS = tuple(spec.label for spec in SELECTING)
REPEATS = ROOT / "docs" / "bench" / "repeats"  # full, kvzip, kvzap (3 samples) and quest, mpcache
GRID = ROOT / "docs" / "bench"  # the published grid: eviction methods, sample 0
EVICTION = ("snapkv", "pyramidkv", "h2o", "knorm", "streaming_llm", "random")
QUERY_AGNOSTIC = ("kvzip", "kvzap")
COMMAND = ".venv/bin/python scripts/selection_report.py --samples {samples} --write"
# the rows' tok/s columns depend on the threads their records ran with: 1, except this row
THREADS_NOTE = "`quest(page_size=4)` ran with `--threads 2`, so its prefill and decode tok/s read higher"


def config(methods: tuple[MethodSpec | str, ...], samples: int) -> BenchConfig:
    return BenchConfig(
        methods=[m if isinstance(m, MethodSpec) else MethodSpec(m) for m in methods],
        budgets=list(BUDGETS),
        tasks=sorted(TASKS),
        lengths=[LENGTH],
        num_samples=samples,
        seed=0,
        haystack="pydocs",
        settings=["query_agnostic"],
        fidelity_tokens=64,
    )


def cut(record: dict, samples: int) -> dict:
    """A record's figures over its first ``samples`` samples."""
    if record.get("source", "kvsqueeze") != "kvsqueeze" or record["num_samples"] <= samples:
        return record
    first = [SampleOutcome(**s) for s in record["samples"][:samples]]
    return {**record, **_statistics(first, record["length"])}


def kvpress_records() -> list[dict]:
    records = []
    for path in sorted((GRID / "kvpress" / "query_agnostic").rglob(f"{LENGTH}.json")):
        records += [r for r in json.loads(path.read_text())["records"] if r["budget"] in BUDGETS]
    return records


def gathered(samples: int) -> list[dict]:
    """Every row of the block, each cut to the first ``samples`` samples."""
    ours = load_records(config(("full", *SELECTING, *QUERY_AGNOSTIC), samples), REPEATS)
    grid = [r for r in load_records(config(EVICTION, 1), GRID) if r["method"] != "full"]
    return [cut(r, samples) for r in ours + grid] + (kvpress_records() if samples == 1 else [])


def selection_lines(records: list[dict]) -> list[str]:
    """Quest and MPCache against the full cache, per budget: average score difference and stored bytes,
    each row against the full cache on the samples that row holds."""
    full = {r["task"]: r for r in records if r["method"] == "full"}
    lines = [
        "| method | budget (attended per step) | samples per task | avg score | full on the same samples "
        "| difference (points) | bytes / full | KL | top-1 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in SELECTING_LABELS:
        for budget in BUDGETS:
            rows = [
                r for r in records if r["method"] == method and r["budget"] == budget and r["task"] in full
            ]
            if not rows:
                continue
            ours = mean_of(r["score"] for r in rows)
            theirs = mean_of(cut(full[r["task"]], r["num_samples"])["score"] for r in rows)
            share = mean_of(r["cache_bytes"] / r["full_cache_bytes"] for r in rows)
            counts = "/".join(map(str, sorted({int(r["num_samples"]) for r in rows})))
            lines.append(
                f"| {method} | {budget:g} | {counts} | {100 * ours:.1f} | {100 * theirs:.1f} "
                f"| {100 * (ours - theirs):+.1f} | {share:.3f} | {mean_of(r['kl'] for r in rows):.3f} "
                f"| {mean_of(r['top1'] for r in rows):.2f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="replace the selection block in docs/RESULTS.md")
    parser.add_argument(
        "--stages", default="run", help="'run' to run quest and mpcache first, '' to only report"
    )
    parser.add_argument(
        "--methods",
        default="",
        help="run only these rows now, by label (e.g. 'quest(group=max)'); all by default",
    )
    parser.add_argument("--samples", type=int, default=1, help="samples per task (records resume)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if "run" in args.stages.split(","):
        import torch

        torch.set_num_threads(args.threads)
        model, tokenizer = kvsqueeze.load_model(MODEL)
        chosen = set(split_labels(args.methods)) if args.methods else set(SELECTING_LABELS)
        unknown = chosen - set(SELECTING_LABELS)
        if unknown:
            raise SystemExit(
                f"--methods: unknown row(s) {sorted(unknown)}; rows are {list(SELECTING_LABELS)}"
            )
        rows = tuple(spec for spec in SELECTING if spec.label in chosen)
        run_bench(model, tokenizer, config(rows, args.samples), REPEATS, model_name=MODEL)
    records = gathered(args.samples)
    counts = sorted({int(r["num_samples"]) for r in records if r["method"] in SELECTING_LABELS})
    tasks = sorted({r["task"] for r in records if r["method"] in SELECTING_LABELS})
    command = COMMAND.format(samples=args.samples) + (f" --methods '{args.methods}'" if args.methods else "")
    lines = [
        f"Model `{MODEL}` (fp32, 1 CPU thread; {THREADS_NOTE}), {LENGTH}-token contexts, query-agnostic (the "
        f"question after compression), seed 0, `pydocs` haystack. Command: `{command}` (resumable; "
        f"`{COMMAND.format(samples=1)}` ran the rows that hold 1 sample). The selecting rows hold "
        f"{', '.join(map(str, counts)) or 'no'} sample(s) per task on {len(tasks)} of {len(TASKS)} tasks. "
        f"The first table reads each row on the samples it holds (up to {args.samples}) against the full cache "
        "on the same samples; the task table reads every row on sample 0 (the eviction rows and kvpress's hold "
        "only it); the last table pairs them sample by sample. A budget r is `ceil(r * prompt)` tokens: what an "
        "eviction method keeps, and what a selecting method's decode step attends to (quest stores every row "
        "plus its page bounds, mpcache the half of the prompt its static eviction keeps plus its bounds: see "
        "bytes / full). Both attend densely to the question (a multi-token call) and select at each generated "
        "token; KL and top-1 come from teacher-forcing the full cache's continuation token by token. "
        "`quest(group=max)` scores a page for a KV head by its best query head's bound, relative to that "
        "head's best page, instead of the sum over the group; `quest(page_size=8)` and `quest(page_size=4)` "
        "bound pages of 8 and 4 tokens instead of 16. Page bounds are stored in fp16 since commit c11a771; the "
        "rows run before it (`quest`, `quest(group=max)`, `mpcache`, and "
        "`quest(bounds_dtype=float32,page_size=4)`, which is `quest(page_size=4)` as it ran then) stored them "
        "in fp32, which their bytes / full count (fp16 bounds take half as many bytes). A row holding fewer "
        "samples than "
        "asked was stopped before the end (`samples per task` says which); its records are kept and resume.",
        "",
        *selection_lines(records),
        "",
        markdown_table(gathered(1), "query_agnostic"),
        "",
        "Sample by sample against the full cache (same samples):",
        "",
        paired_table(records),
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "selection", body)


if __name__ == "__main__":
    main()
