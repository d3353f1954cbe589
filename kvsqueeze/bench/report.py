"""Benchmark output a person reads: a Markdown table and PNG plots, from the per-run JSON records."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from kvsqueeze.generation import format_bytes


def _row_key(record: dict) -> tuple[str, str, float]:
    return record.get("source", "kvsqueeze"), record["method"], float(record["budget"])


CALIBRATED = 0.85  # a task counts in the headline average when the full cache scores at least this
OLD_PEAK_MARK = "†"  # a peak RSS measured while every run held deep copies of the model (before 2026-12-08)


def calibrated_tasks(records: list[dict]) -> list[str]:
    """The tasks whose full-cache score (kvsqueeze's own ``full`` rows) is at least ``CALIBRATED``: on the
    others the model itself fails, so a compressed row's loss there says little about the compression."""
    full: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["method"] == "full" and r.get("source", "kvsqueeze") == "kvsqueeze":
            full[r["task"]].append(r["score"])
    return sorted(t for t, scores in full.items() if mean_of(scores) >= CALIBRATED)


def _contexts(records: list[dict], lengths: list[int]) -> str:
    """The context lengths of a table: the generated lengths, or a dataset's (length 0) mean prompt."""
    generated = [str(n) for n in lengths if n]
    parts = [f"{', '.join(generated)} tokens"] if generated else []
    if 0 in lengths:
        mean = mean_of(r.get("prompt_tokens") for r in records if r["length"] == 0)
        parts.append("a dataset's prompts" + (f" (mean {mean:.0f} tokens)" if mean == mean else ""))
    return ", ".join(parts)


def markdown_table(records: list[dict], setting: str) -> str:
    """One row per (source, method, budget): score per task, average (over every task, and over the tasks
    the full cache passes, see :func:`calibrated_tasks`), fidelity, memory, speed, overhead."""
    records = [r for r in records if r["setting"] == setting]
    if not records:
        return f"_no results for {setting}_"
    tasks = sorted({r["task"] for r in records})
    passed = calibrated_tasks(records)
    lengths = sorted({r["length"] for r in records})
    rows: dict[tuple[str, str, float], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        rows[_row_key(record)][record["task"]].append(record)
    header = [
        "source",
        "method",
        "keep",
        *tasks,
        "avg",
        f"avg (full ≥ {100 * CALIBRATED:.0f}%)",
        "tasks",
        "KL",
        "top-1",
        "bytes / full",
        "peak RSS",
        "prefill tok/s",
        "decode tok/s",
        "overhead",
    ]
    lines = [
        f"Setting `{setting}`, context {_contexts(records, lengths)}; scores in %; avg over "
        "the row's tasks (`tasks` says how many ran), and over the tasks where the full cache scores at least "
        f"{100 * CALIBRATED:.0f}% ({_excluded(tasks, passed)}); "
        "KL and top-1 against the full cache over a teacher-forced continuation; "
        "peak RSS = the process's peak resident memory while the row ran (kvsqueeze: the model and the "
        "prompt's recorded prefill, which every row forks from, included; kvpress: its worker's peak), "
        f"{OLD_PEAK_MARK} = measured before 2026-12-08, when each run also held deep copies of the model "
        "(one or more models' weights too high); "
        "overhead = time spent compressing (scoring and selection) / prefill time.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + " |",
    ]
    for key in sorted(rows, key=lambda k: (k[1] != "full", k[0], k[1], -k[2])):
        by_task = rows[key]
        every = [r for rs in by_task.values() for r in rs]
        scores = [mean_of(r["score"] for r in by_task[t]) if t in by_task else float("nan") for t in tasks]
        cells = [
            key[0],
            key[1],
            f"{key[2]:g}",
            *[_pct(s) for s in scores],
            _pct(mean_of(scores)),
            _pct(mean_of(s for t, s in zip(tasks, scores, strict=True) if t in passed)),
            str(len(by_task)),
            _num(mean_of(r["kl"] for r in every), 3),
            _pct(mean_of(r["top1"] for r in every)),
            _num(mean_of(r["cache_bytes"] / max(1, r["full_cache_bytes"]) for r in every), 3),
            _bytes(mean_of(r.get("peak_rss_bytes") for r in every)) + _copied_models_mark(every),
            _num(mean_of(r.get("prefill_tokens_per_second") for r in every), 0),
            _num(mean_of(r["decode_tokens_per_second"] for r in every), 1),
            _num(mean_of(r["compression_overhead"] for r in every), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    # the full row's own records: kvpress's rows may run in another dtype, with another full cache
    full_rows = [r for r in records if r["method"] == "full" and r.get("source") != "kvpress"] or records
    full_bytes = mean_of(r["full_cache_bytes"] for r in full_rows)
    lines += ["", f"Full cache: {format_bytes(int(full_bytes))} on average per sample."]
    return "\n".join(lines)


def _copied_models_mark(records: list[dict]) -> str:
    """:data:`OLD_PEAK_MARK` if a kvsqueeze record's peak was measured while runs copied the model."""
    ours = [r for r in records if r.get("source", "kvsqueeze") == "kvsqueeze"]
    return OLD_PEAK_MARK if any(not r.get("peak_rss_own", False) for r in ours) else ""


def _excluded(tasks: list[str], passed: list[str]) -> str:
    left_out = [t for t in tasks if t not in passed]
    return "left out: " + ", ".join(left_out) if left_out else "all of them"


def paired_table(records: list[dict], baseline: str = "full") -> str:
    """Each row against ``baseline`` sample by sample: on the samples both ran, the mean score difference
    in points with its standard error (the spread of the per-sample differences over the square root of
    their number), how many samples scored lower and higher, and the row's mean KL.

    Both rows answer the same samples, so the noise a task's sampling adds to each average cancels in
    the difference; what is left says how far apart two rows can be before the sample count tells them
    apart.
    """
    samples: dict[str, dict[str, dict]] = defaultdict(dict)  # row -> sample id -> sample
    for record in records:
        budget = record.get("budget", 1.0)
        # one row per keep ratio; another source's rows are named after it (`kvpress kvzip @ 0.25`)
        row = record["method"] if budget == 1 else f"{record['method']} @ {budget:g}"
        if record.get("source", "kvsqueeze") != "kvsqueeze":
            row = f"{record['source']} {row}"
        for sample in record.get("samples", ()):  # kvpress records from before 2026-12-07 hold averages only
            samples[row][sample["sample_id"]] = sample
    if baseline not in samples:
        return f"_no {baseline} records to pair with_"
    lines = [
        "| row | samples | score − " + baseline + " (points) | standard error | lower | higher | KL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference = samples[baseline]
    for method in sorted(m for m in samples if m != baseline):
        shared = sorted(set(samples[method]) & set(reference))
        diffs = [100 * (samples[method][i]["score"] - reference[i]["score"]) for i in shared]
        if not diffs:
            continue
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        cells = [
            f"`{method}`",
            str(len(diffs)),
            f"{mean_of(diffs):+.1f}",
            f"{spread / len(diffs) ** 0.5:.1f}",
            str(sum(d < 0 for d in diffs)),
            str(sum(d > 0 for d in diffs)),
            _num(mean_of(samples[method][i]["kl"] for i in shared), 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_summary(
    records: list[dict], setting: str, methods: list[str], budgets: list[float], rival_setting: str
) -> str:
    """Average score (and bytes / full) over the tasks of ``setting`` for the kvsqueeze ``methods`` at each
    budget, beside the full cache and the best kvpress press of ``rival_setting`` at the same budget."""
    tasks = sorted({r["task"] for r in records if r["setting"] == setting})

    def cell(rows: list[dict]) -> str:
        if not rows:
            return "not run"
        by_task = {r["task"]: r for r in rows}
        done = f" ({len(by_task)} of {len(tasks)} tasks)" if len(by_task) < len(tasks) else ""
        size = mean_of(r["cache_bytes"] / max(1, r["full_cache_bytes"]) for r in rows)
        return f"{_pct(mean_of(r['score'] for r in by_task.values()))} ({size:.2f}){done}"

    def ours(method: str, budget: float) -> list[dict]:
        return [
            r
            for r in records
            if r["setting"] == setting
            and r.get("source", "kvsqueeze") == "kvsqueeze"
            and r["method"] == method
            and (method == "full" or float(r["budget"]) == budget)
        ]

    def best_press(budget: float) -> tuple[str, list[dict]]:
        presses: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            if (
                r.get("source") == "kvpress"
                and r["setting"] == rival_setting
                and float(r["budget"]) == budget
            ):
                presses[r["method"]].append(r)
        if not presses:
            return "kvpress", []
        name = max(presses, key=lambda m: mean_of(r["score"] for r in presses[m]))
        return name, presses[name]

    header = ["row", *[f"keep {b:g}" for b in budgets]]
    lines = [
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * len(budgets),
        "| full cache | " + " | ".join(cell(ours("full", 1.0)) for _ in budgets) + " |",
    ]
    presses = [best_press(b) for b in budgets]
    lines.append(
        f"| kvpress's best press ({rival_setting}) | "
        + " | ".join(f"{name}: {cell(rows)}" for name, rows in presses)
        + " |"
    )
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cell(ours(method, b)) for b in budgets) + " |")
    return "\n".join(lines)


def plot_results(records: list[dict], out: Path) -> list[Path]:
    """score vs budget per task, stored bytes vs budget, decode tok/s vs context length. Returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for setting in sorted({r["setting"] for r in records}):
        subset = [r for r in records if r["setting"] == setting]
        tasks = sorted({r["task"] for r in subset})
        cols = min(4, len(tasks))
        rows = (len(tasks) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, task in zip(axes.flat, tasks, strict=False):
            _lines(ax, [r for r in subset if r["task"] == task], "budget", "score", task)
            ax.set_xlabel("keep ratio")
            ax.set_ylabel("score")
        for ax in list(axes.flat)[len(tasks) :]:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, out / f"score_vs_budget_{setting}.png"))

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in subset:
            r["bytes_ratio"] = r["cache_bytes"] / max(1, r["full_cache_bytes"])
        _lines(ax, subset, "budget", "bytes_ratio", "stored cache bytes / full")
        ax.set_xlabel("keep ratio")
        written.append(_save(fig, out / f"bytes_vs_budget_{setting}.png"))

        fig, ax = plt.subplots(figsize=(5, 3.5))
        _lines(ax, subset, "length", "decode_tokens_per_second", "decode tokens/s")
        ax.set_xlabel("context tokens")
        written.append(_save(fig, out / f"decode_speed_vs_length_{setting}.png"))
    plt.close("all")
    return written


def _lines(ax, records: list[dict], x: str, y: str, title: str) -> None:
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        label = r["method"] if r.get("source", "kvsqueeze") == "kvsqueeze" else f"kvpress:{r['method']}"
        series[label][float(r[x])].append(float(r[y]))
    for label in sorted(series):
        points = sorted((k, mean_of(v)) for k, v in series[label].items())
        style = "--" if label.startswith("kvpress:") else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label, markersize=3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def parse_stages(text: str, known: Sequence[str]) -> list[str]:
    """A report script's ``--stages`` (a comma list; ``''`` runs none and only writes the report), each one
    of ``known``; an unknown one exits with a one-line message."""
    stages = [stage for stage in text.split(",") if stage]
    if unknown := set(stages) - set(known):
        raise SystemExit(f"unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(known)}")
    return stages


def split_labels(text: str) -> list[str]:
    """A report script's ``--methods``: row labels separated by commas, where a label's own parameters
    (``quest(bounds_dtype=float32,page_size=4)``) keep theirs."""
    return re.split(r",(?![^()]*\))", text)


def replace_block(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the Markdown file at
    ``path``, replacing what was there; the markers are appended at the end if the file lacks them."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def mean_of(values: Iterable[float | None]) -> float:
    """The mean of the values that are there: ``None`` and NaN are left out; NaN when none is left."""
    present = [float(v) for v in values if v is not None and v == v]
    return sum(present) / len(present) if present else float("nan")


def _pct(value: float) -> str:
    return "–" if value != value else f"{100 * value:.0f}"


def _bytes(value: float) -> str:
    return "–" if value != value else format_bytes(int(value))


def _num(value: float, digits: int) -> str:
    return "–" if value != value else f"{value:.{digits}f}"
