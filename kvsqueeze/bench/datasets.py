"""Load user-provided long-context datasets from JSON Lines files.

Each line is an object with ``context`` (str), ``question`` (str) and ``answers`` (a string or a
non-empty list of strings), and optionally ``answer_prefix`` (str), ``task`` (str, default "jsonl")
and ``metric`` ("all" or "part", default "part"; see :mod:`kvsqueeze.bench.scoring`). The benchmark
groups a file's samples by ``task`` (:func:`group_by_task`) and reports each task on its own; ``task``
names a results folder, so it may not contain a slash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvsqueeze.bench.scoring import METRICS
from kvsqueeze.bench.tasks import Sample


def _parse(record: Any, source: str, line_number: int) -> Sample:
    """A Sample from one decoded line; ValueError with the reason if a field is missing or invalid."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for name in ("context", "question"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise ValueError(f"field {name!r} must be a non-empty string")
    answers = record.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise ValueError(
            "field 'answers' must be a non-empty string or a non-empty list of non-empty strings"
        )
    for name in ("answer_prefix", "task"):
        if name in record and not isinstance(record[name], str):
            raise ValueError(f"field {name!r} must be a string")
    task = record.get("task") or "jsonl"
    if "/" in task or "\\" in task or task in (".", ".."):
        raise ValueError(
            f"field 'task' must work as a folder name (no '/' or '\\', not '.' or '..'), got {task!r}"
        )
    metric = record.get("metric", "part")
    if metric not in METRICS:
        raise ValueError(f"field 'metric' must be one of {', '.join(METRICS)}")
    return Sample(
        task=task,
        context=record["context"],
        question=record["question"],
        answers=answers,
        answer_prefix=record.get("answer_prefix", ""),
        metadata={"source": source, "line": line_number, "metric": metric},
    )


def load_jsonl_dataset(path: str | Path) -> tuple[list[Sample], list[str]]:
    """Read samples from a JSON Lines file.

    Returns (samples, errors): malformed lines are skipped and described in ``errors`` as
    "line N: reason" (N is 1-based); blank lines are ignored. Raises ValueError if the file does not
    exist or has no valid line.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"dataset file not found: {file}")
    samples: list[Sample] = []
    errors: list[str] = []
    with file.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"line {line_number}: invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            try:
                samples.append(_parse(record, str(file), line_number))
            except ValueError as exc:
                errors.append(f"line {line_number}: {exc}")
    if not samples:
        detail = f"; first error: {errors[0]}" if errors else " (the file is empty)"
        raise ValueError(f"no valid sample in {file}: {len(errors)} malformed line(s){detail}")
    return samples, errors


def group_by_task(samples: list[Sample], limit: int | None = None) -> dict[str, list[Sample]]:
    """The samples by their ``task``, tasks in order of first appearance, samples in file order.

    ``limit`` keeps at most that many samples per task (``None``: all of them).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"the number of samples per task must be at least 1, got {limit}")
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        group = groups.setdefault(sample.task, [])
        if limit is None or len(group) < limit:
            group.append(sample)
    return groups
