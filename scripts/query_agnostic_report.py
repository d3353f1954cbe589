"""Query-agnostic compression on the suite: native kvzip and the learned kvzap beside the full cache, SnapKV
and kvpress's KVzip, at REPEAT_SAMPLES samples per task, and write its block in docs/RESULTS.md.

    .venv/bin/python scripts/query_agnostic_report.py --write                     # every stage, then publish
    .venv/bin/python scripts/query_agnostic_report.py --stages query_agnostic     # one stage now
    .venv/bin/python scripts/query_agnostic_report.py --stages '' --write         # publish what is on disk
    .venv/bin/python scripts/query_agnostic_report.py --model smollm2-135m --write  # the second architecture

Qwen2.5-Coder-0.5B runs at 4096 tokens and its records go to docs/bench/repeats (beside the 3-sample
full-cache records the quantization rows use, which they share); SmolLM2-135M runs at 2048 tokens into
docs/bench/smollm2-135m; Qwen2.5-Coder-1.5B runs at 2048 tokens in bfloat16 into
docs/bench/qwen2.5-coder-1.5b/bfloat16, beside its quantization rows' full-cache records
(``--model qwen2.5-coder-1.5b --stages query_agnostic --methods kvzap``). Records are rewritten after every
sample, so an interrupted run resumes and nothing is computed twice. Stages: ``query_agnostic`` (kvzip and
kvzap at 0.1 and 0.25), ``kvpress`` (kvpress's KVzip on the same samples, its own venv, float32),
``query_aware`` (kvzip, kvzap, SnapKV and CAKE with the question inside the compressed prompt) and
``kvpress_query_aware`` (kvpress's KVzip there), ``kvpress_plus`` (kvpress's KVzip+ query-agnostic, beside
``kvzip(plus=True)``), and ``equal_bytes`` (query-agnostic at the bytes of keep 0.1
and 0.25: kvzap there, beside kvzap keeping more and quantizing it). kvpress's records hold
each sample's score, so its rows are paired with ours sample by sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze.bench import TASKS
from kvsqueeze.bench.report import (
    markdown_table,
    mean_of,
    paired_table,
    parse_stages,
    replace_block,
    split_labels,
)
from kvsqueeze.bench.runner import BenchConfig, MethodSpec, load_records, run_bench

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ".venv/bin/python scripts/query_agnostic_report.py --write"


FP32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class Target:
    """A model the report runs on: its context length, where its records live, the block it writes, and the
    dtype each setting runs in (records of a non-fp32 dtype go to a sub-folder named after it)."""

    length: int
    out: Path
    block: str
    dtypes: dict[str, torch.dtype]


# The first two models' query-agnostic rows were run in float32 before bfloat16 was fast on CPU (the dtype
# block); every row run since uses bfloat16 like the other published runs, with its own full-cache rows.
TARGETS = {
    "qwen2.5-coder-0.5b": Target(
        4096,
        ROOT / "docs" / "bench" / "repeats",
        "query_agnostic",
        {"query_agnostic": FP32, "query_aware": BF16},
    ),
    "smollm2-135m": Target(
        2048,
        ROOT / "docs" / "bench" / "smollm2-135m",
        "query_agnostic_smollm2",
        {"query_agnostic": FP32, "query_aware": BF16},
    ),
    # the largest packaged model, at the length its quantization rows use (their full-cache records are shared)
    "qwen2.5-coder-1.5b": Target(
        2048,
        ROOT / "docs" / "bench" / "qwen2.5-coder-1.5b",
        "query_agnostic_1p5b",
        {"query_agnostic": BF16, "query_aware": BF16},
    ),
}
REPEAT_SAMPLES = 3
BUDGETS = (0.1, 0.25)
STAGES = ("query_agnostic", "kvpress", "query_aware", "kvpress_query_aware", "equal_bytes", "kvpress_plus")
# kvpress stage -> (setting, press); kvpress's KVzip+ (kvzip_plus) keeps its records in a folder of its own
KVPRESS_STAGES = {
    "kvpress": ("query_agnostic", "kvzip"),
    "kvpress_query_aware": ("query_aware", "kvzip"),
    "kvpress_plus": ("query_agnostic", "kvzip_plus"),
}
# the kvpress presses the report reads, and how its paired tables name them
KVPRESS_RUN = {"kvzip": "kvpress's KVzip (float32)", "kvzip_plus": "kvpress's KVzip+ (float32)"}
# kvzip(keep_header=True) keeps the chat template's header whole (kvzip's default until 2026-12-07; the
# query-aware rows ran with it). Query-aware also runs it with a recent window at 0.1, where a replay scores
# the question like any context and evicts it, and cake, the grid's best query-aware eviction method (the bench
# block), on the same samples
KEEP_HEADER = {"keep_header": True}
# KVzip+: each replay attention weighed by ||W_O v|| / ||h|| (the KVzap paper's teacher)
PLUS = {"plus": True}
FLOOR = {"floor": 0.25}
ROWS = {
    "query_agnostic": (
        MethodSpec("kvzip"),
        MethodSpec("kvzip", KEEP_HEADER),
        MethodSpec("kvzip", PLUS),
        MethodSpec("kvzap"),
        MethodSpec("kvzap", PLUS),
        MethodSpec("kvzap", {"mlp": True, **PLUS}),  # the MLP student (calibrate --student mlp)
        # every (layer, KV head) first gets its best quarter (half) of its share of the budget (the global
        # top-k alone leaves most layers a few rows at keep 0.1: scripts/kept_rows.py)
        MethodSpec("kvzap", FLOOR),
        MethodSpec("kvzap", {**PLUS, **FLOOR}),
        MethodSpec("kvzap", {**PLUS, "floor": 0.5}),
        MethodSpec("kvzip", {**PLUS, **FLOOR}),  # the teacher with the same floors
        MethodSpec("kvzip", {**PLUS, "floor": 0.5}),
    ),
    "query_aware": (
        MethodSpec("kvzip", KEEP_HEADER),
        MethodSpec("kvzip", {**KEEP_HEADER, "window": 16}, budgets=(0.1,)),
        MethodSpec("kvzap"),
        MethodSpec("snapkv"),
        MethodSpec("cake"),
    ),
}
# Query-agnostic at the bytes of keep 0.1 and 0.25, two ways each: evict to that share, or evict less and
# quantize what stays: ZipCache (about 0.25x a bf16 cache's bytes) on 40%, KIVI at 4 bits (about 0.35x) on
# 70%; bfloat16, so bytes / full is against bf16 rows
EQUAL_BYTES_KEEPS = (0.1, 0.25)  # kvzap's keep ratios, whose bytes the quantized rows match
EQUAL_BYTES = (
    MethodSpec("kvzap", budgets=EQUAL_BYTES_KEEPS),
    MethodSpec("kvzap+zipcache", budgets=(0.4,)),
    MethodSpec("kvzap+kivi", {"bits": 4}, budgets=(0.7,)),
)


def config(setting: str, target: Target) -> BenchConfig:
    return BenchConfig(
        methods=list(ROWS[setting]),
        budgets=list(BUDGETS),
        tasks=sorted(TASKS),
        lengths=[target.length],
        num_samples=REPEAT_SAMPLES,
        seed=0,
        haystack="pydocs",
        settings=[setting],
        fidelity_tokens=64,
    )


def equal_bytes_config(target: Target) -> BenchConfig:
    return dataclasses.replace(config("query_agnostic", target), methods=list(EQUAL_BYTES))


def dtype_name(target: Target, setting: str) -> str:
    """The dtype a setting runs in, by name (``bfloat16``)."""
    return str(target.dtypes[setting]).removeprefix("torch.")


def records_folder(target: Target, setting: str) -> Path:
    """Where a setting's run records live: the target's folder, in a sub-folder named after a non-fp32 dtype."""
    name = dtype_name(target, setting)
    return target.out if name == "float32" else target.out / name


def kvpress_folder(target: Target, press: str) -> Path:
    """Where a kvpress press's records live (``<folder>/kvpress/<setting>/<task>/<length>.json``)."""
    return target.out if press == "kvzip" else target.out / press


def kvpress_records(target: Target, setting: str) -> list[dict]:
    records = []
    for press in KVPRESS_RUN:
        for path in sorted(
            (kvpress_folder(target, press) / "kvpress" / setting).rglob(f"{target.length}.json")
        ):
            records += [r for r in json.loads(path.read_text())["records"] if r["method"] == press]
    return records


def sample_zero_lines(records: list[dict]) -> list[str]:
    """Score per task on sample 0 beside kvpress's KVzip from the published grid (docs/bench/kvpress, which
    ran sample 0 only), average over the tasks both have."""
    theirs = {}
    for path in sorted((ROOT / "docs" / "bench" / "kvpress" / "query_agnostic").rglob("*.json")):
        for r in json.loads(path.read_text())["records"]:
            if r["method"] == "kvzip":
                theirs[(r["task"], r["budget"])] = r["score"]
    ours: dict[tuple[str, float], dict[str, float]] = {}
    for r in records:
        if r.get("source", "kvsqueeze") == "kvsqueeze" and r["method"] in ("kvzip", "kvzap", "full"):
            ours.setdefault((r["method"], r["budget"]), {})[r["task"]] = r["samples"][0]["score"]
    tasks = sorted({t for by_task in ours.values() for t in by_task})
    if not tasks:
        return []
    lines = [
        "| row | keep | " + " | ".join(tasks) + " | avg |",
        "| --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: |",
    ]
    rows = [(f"kvsqueeze {m}", b, ours[(m, b)]) for m, b in sorted(ours)]
    rows += [("kvpress kvzip", b, {t: theirs[(t, b)] for t in tasks if (t, b) in theirs}) for b in BUDGETS]
    for label, budget, by_task in rows:
        cells = [f"{100 * by_task[t]:.0f}" if t in by_task else "-" for t in tasks]
        average = mean_of(by_task[t] for t in tasks if t in by_task)
        lines.append(f"| {label} | {budget:g} | " + " | ".join(cells) + f" | {100 * average:.0f} |")
    return lines


def sample_counts(records: list[dict]) -> str:
    """How many samples per task each source's rows hold (a run cut short holds fewer than asked)."""
    counts: dict[str, set[int]] = {}
    for r in records:
        counts.setdefault(r.get("source", "kvsqueeze"), set()).add(int(r["num_samples"]))
    parts = [f"{source}: {', '.join(map(str, sorted(n)))}" for source, n in sorted(counts.items())]
    return f"Samples per task in these rows ({'; '.join(parts)}); a row averages the samples it holds."


def overhead_lines(records: list[dict]) -> list[str]:
    """Prefill plus compression against a plain prefill, per row (mean over its tasks)."""
    rows: dict[tuple[str, str, float], list[float]] = {}
    for r in records:
        rows.setdefault((r.get("source", "kvsqueeze"), r["method"], r["budget"]), []).append(
            r.get("compression_overhead", 0.0)
        )
    lines = [
        "| source | method | keep | (prefill + compression) / plain prefill |",
        "| --- | --- | --- | ---: |",
    ]
    for (source, method, budget), values in sorted(rows.items()):
        if method != "full":
            lines.append(f"| {source} | {method} | {budget:g} | {1 + mean_of(values):.2f}x |")
    return lines


def against(records: list[dict], budget: float, row: str, name: str) -> list[str]:
    """Every row at keep ``budget`` paired sample by sample with row ``row`` (shown as ``name``) there."""
    same = [r for r in records if r["method"] != "full" and r["budget"] == budget]
    return [
        "",
        f"Against {name} at keep {budget:g}, sample by sample:",
        "",
        paired_table(same, baseline=f"{row} @ {budget:g}"),
    ]


def floor_lines(records: list[dict]) -> list[str]:
    """Each floored row against the same method without the floor, sample by sample, per keep ratio."""
    lines = []
    for spec in ROWS["query_agnostic"]:
        if not spec.params.get("floor"):
            continue
        plain = MethodSpec(spec.name, {k: v for k, v in spec.params.items() if k != "floor"}).label
        pair = [r for r in records if r["method"] in (plain, spec.label)]
        for budget in BUDGETS:
            if any(r["method"] == spec.label and r["budget"] == budget for r in pair):
                lines += against(pair, budget, plain, f"`{plain}` without the floor")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the query_agnostic block in docs/RESULTS.md"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(TARGETS))
    parser.add_argument(
        "--methods",
        help="run only these of the stage's rows now, by label (`kvzip(keep_header=True,window=16)`; comma "
        "list; default: all)",
    )
    args = parser.parse_args()
    stages = parse_stages(args.stages, STAGES)
    target = TARGETS[args.model]
    chosen = set(split_labels(args.methods)) if args.methods else None
    if chosen is not None:  # a misspelled label would run nothing and say nothing
        settings = [s for s in ("query_agnostic", "query_aware") if s in stages]
        known = {m.label for setting in settings for m in config(setting, target).methods}
        unknown = chosen - known
        if unknown or not settings:
            raise SystemExit(
                f"--methods: unknown row(s) {sorted(unknown)} for stages {settings}; rows are {sorted(known)}"
                if settings
                else "--methods chooses rows of the query_agnostic and query_aware stages; neither is in --stages"
            )
    for setting in ("query_agnostic", "query_aware"):
        if setting in stages:
            model, tokenizer = kvsqueeze.load_model(args.model, dtype=target.dtypes[setting])
            rows = config(setting, target)
            if chosen is not None:  # run only these now; the tables still show every row on disk
                rows = dataclasses.replace(rows, methods=[m for m in rows.methods if m.label in chosen])
            run_bench(model, tokenizer, rows, records_folder(target, setting), model_name=args.model)
    if "equal_bytes" in stages:
        model, tokenizer = kvsqueeze.load_model(args.model, dtype=BF16)
        run_bench(
            model, tokenizer, equal_bytes_config(target), target.out / "bfloat16", model_name=args.model
        )
    for stage, (setting, press) in KVPRESS_STAGES.items():
        if stage in stages:  # in kvpress's venv, float32; here only the tokenizer is needed
            from transformers import AutoTokenizer

            from kvsqueeze.bench.baseline import run_kvpress_baseline
            from kvsqueeze.models import hf_folder

            tokenizer = AutoTokenizer.from_pretrained(hf_folder(args.model))
            run_kvpress_baseline(
                tokenizer,
                config(setting, target),
                kvpress_folder(target, press),
                args.model,
                presses=(press,),
                teachers_in=records_folder(target, setting),
            )
    command = COMMAND if target.block == "query_agnostic" else f"{COMMAND} --model {args.model}"
    lines = [
        f"Model `{args.model}`, {target.length}-token contexts, samples 0 to "
        f"{REPEAT_SAMPLES - 1} of every task asked for (seed 0, `pydocs` haystack), keep ratios "
        f"{', '.join(f'{b:g}' for b in BUDGETS)}. Command: `{command}` (resumable from its run records)."
        + (
            " kvpress's KVzip rows ran on the same samples in kvpress's own venv (they mask evicted keys)."
            if kvpress_records(target, "query_agnostic") or kvpress_records(target, "query_aware")
            else ""
        ),
        "",
        "`kvzip(plus=True)` scores KVzip+, the KVzap paper's teacher: each replay attention is weighed by "
        "`||W_O v||` of the row over `||h||` of the query's input before the max (`kvpress kvzip_plus` is "
        "kvpress's `KVzipPress(kvzip_plus_normalization=True)`, `--stages kvpress_plus`). `kvzap(plus=True)` "
        "is kvzap with weights fitted to those scores (`scripts/make_scorer_weights.py --teacher kvzip+`); "
        "plain `kvzap` is fitted to KVzip's. `kvzap(mlp=True,plus=True)` is the paper's two-layer MLP student "
        "(64 hidden units) fitted to the same scores on 1024 sampled rows per document; its weights do not ship "
        "(`scripts/make_scorer_weights.py --teacher kvzip+ --student mlp ALIAS` makes them in the user cache). "
        "`floor=F`: every layer and KV head first keeps its best F x the average budget, then one top-k ranks "
        "the rest (the plain top-k follows each layer's score scale and can leave a layer only its sinks: "
        "`scripts/kept_rows.py`); each floored row is paired below with the same method without it.",
    ]
    for setting in ("query_agnostic", "query_aware"):
        records = load_records(config(setting, target), records_folder(target, setting))
        records += kvpress_records(target, setting)
        if not any(r["method"] != "full" for r in records):
            lines += ["", f"### {setting}", "", f"_not run yet: `--stages {setting}`_"]
            continue
        lines += [
            "",
            f"### {setting}",
            "",
            f"kvsqueeze rows in {dtype_name(target, setting)} (run records in "
            f"`{records_folder(target, setting).relative_to(ROOT)}`). " + sample_counts(records),
            "",
            markdown_table(records, setting) if records else "_not run yet_",
            "",
            "Sample by sample against the full cache (same samples):",
            "",
            paired_table(records) if records else "_not run yet_",
            "",
            *overhead_lines(records),
        ]
        if setting == "query_aware":  # the query-aware target: not below snapkv at any ratio
            for budget in BUDGETS:
                lines += against(records, budget, "snapkv", "snapkv")
        # the issue's: ahead of kvpress's KVzip on the same samples (and our KVzip+ against theirs)
        ran = {press: set() for press in KVPRESS_RUN}
        for r in records:
            if r.get("source") == "kvpress" and r.get("samples"):
                ran[r["method"]].add(r["budget"])
        for press, name in KVPRESS_RUN.items():
            for budget in sorted(ran[press]):
                lines += against(records, budget, f"kvpress {press}", name)
        if setting == "query_agnostic":
            lines += floor_lines(records)
        theirs = ran["kvzip"]
        if setting == "query_agnostic" and target.block == "query_agnostic" and not theirs:
            zero = sample_zero_lines(records)
            if zero:
                lines += [
                    "",
                    "Sample 0 of each task beside kvpress's KVzip, which the published grid ran on sample 0 "
                    "only (`docs/bench/kvpress`, same model, samples and ratios; its rows mask evicted keys):",
                    "",
                    *zero,
                ]
    equal = load_records(equal_bytes_config(target), target.out / "bfloat16")
    if any(r["method"] != "full" for r in equal):
        lines += [
            "",
            "### query_agnostic at the bytes of keep 0.1 and 0.25",
            "",
            "kvzap evicting to the keep ratio, beside kvzap keeping more and quantizing what it keeps (ZipCache "
            "on 40%, KIVI at 4 bits on 70%), all in bfloat16, so `bytes / full` is against a bfloat16 cache "
            f"(run records in `{(target.out / 'bfloat16').relative_to(ROOT)}`; `--stages equal_bytes`). "
            + sample_counts(equal),
            "",
            markdown_table(equal, "query_agnostic"),
            "",
            "Sample by sample against the full cache:",
            "",
            paired_table(equal),
        ]
        compressed = [r for r in equal if r["method"] != "full"]
        for budget in EQUAL_BYTES_KEEPS:
            paired = paired_table(compressed, f"kvzap @ {budget:g}")
            lines += ["", f"Against kvzap at keep {budget:g}:", "", paired]
    body = "\n".join(lines)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", target.block, body)


if __name__ == "__main__":
    main()
