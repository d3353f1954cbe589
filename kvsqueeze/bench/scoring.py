"""RULER's string-match metrics.

An answer counts as found when it occurs in the prediction as a case-insensitive substring.
``all`` gives partial credit (the fraction of answers found); ``part`` gives 1.0 if any is found.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from kvsqueeze.bench.tasks import TASKS, Sample

_BLANK_LINE = re.compile(r"\n\s*\n")


def _check(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty list of strings")


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` (case-insensitive substring match)."""
    _check(answers)
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` occurs in ``prediction`` (case-insensitive substring match), else 0.0."""
    _check(answers)
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "all": string_match_all,
    "part": string_match_part,
}


def postprocess(prediction: str, answer_prefix: str = "") -> str:
    """Clean a model reply: drop a repeated ``answer_prefix``, then keep the first paragraph that says
    something (a reply opening with a bare ``:`` and a blank line before its list keeps the list)."""
    text = prediction.strip()
    prefix = answer_prefix.strip()
    if prefix and text.lower().startswith(prefix.lower()):
        text = text[len(prefix) :]
    for paragraph in _BLANK_LINE.split(text):
        if any(ch.isalnum() for ch in paragraph):
            return paragraph.strip()
    return text.strip()


def metric_name(sample: Sample) -> str:
    """The metric of a sample: ``metadata["metric"]``, else its task's, else ``"part"``."""
    name = sample.metadata.get("metric")
    if name is None:
        task = TASKS.get(sample.task)
        name = task.metric if task is not None else "part"
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    return name


def score_sample(sample: Sample, prediction: str) -> float:
    """Score a model reply (the text generated after ``sample.answer_prefix``) in [0, 1]."""
    return METRICS[metric_name(sample)](postprocess(prediction, sample.answer_prefix), sample.answers)
