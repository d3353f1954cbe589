"""kvpress side by side: the same model, samples, settings and keep ratios, run by kvpress's own presses.

kvpress 0.5.5 pins transformers < 5.3, so it runs in its own venv (:mod:`kvsqueeze.bench.kvpress_env`),
driven through JSON. Its rows join the kvsqueeze rows in the same table and plots, with ``source:
"kvpress"`` and kvpress's version in every record. Fidelity uses the same teacher continuation as the
kvsqueeze rows (the full cache's greedy continuation, read from the ``full`` run records).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from kvsqueeze.bench.kvpress_env import KVPRESS_PRESSES, run_kvpress
from kvsqueeze.bench.report import mean_of
from kvsqueeze.bench.runner import BenchConfig, answer_tokens, generated_samples, run_path
from kvsqueeze.bench.scoring import postprocess, score_sample
from kvsqueeze.bench.tasks import Sample
from kvsqueeze.models import hf_folder

# the grid's presses; kvzip_plus (KVzip+) runs where asked for, beside our kvzip(plus=True)
DEFAULT_PRESSES = tuple(name for name in KVPRESS_PRESSES if name != "kvzip_plus")


def run_kvpress_baseline(
    tokenizer: PreTrainedTokenizerBase,
    config: BenchConfig,
    out: Path,
    model_name: str | None,
    *,
    samples_for: Callable[[str, int], list[Sample]] | None = None,
    presses: tuple[str, ...] = DEFAULT_PRESSES,
    teachers_in: Path | None = None,
) -> list[dict]:
    """Run kvpress on every (setting, task, length) of ``config``; cached per group under ``out``.

    The full cache's continuations that KL is measured over come from kvsqueeze's full-cache run records in
    ``teachers_in`` (default ``out``); without them kvpress's rows carry no KL.
    """
    folder = hf_folder(model_name)
    make_samples = samples_for or generated_samples(config, tokenizer)
    records: list[dict] = []
    for setting in config.settings:
        for task in config.tasks:
            for length in config.lengths:
                path = out / "kvpress" / setting / task / f"{length}.json"
                if not path.exists():
                    samples = make_samples(task, length)
                    teachers = _teacher_ids(teachers_in or out, setting, task, length)
                    result = _run_group(folder, config, setting, task, length, samples, teachers, presses)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(result, indent=1))
                records.extend(json.loads(path.read_text())["records"])
    return records


def _run_group(
    folder: Path,
    config: BenchConfig,
    setting: str,
    task: str,
    length: int,
    samples: list[Sample],
    teachers: dict[str, list[int]],
    presses: tuple[str, ...],
) -> dict:
    requests = [
        {
            "id": f"{task}-{length}-{i}",
            "context": s.context,
            "question": s.question,
            "answer_prefix": s.answer_prefix,
            "max_new_tokens": answer_tokens(config, task),
            "setting": setting,
            "teacher_ids": teachers.get(f"{task}-{length}-{i}", []),
        }
        for i, s in enumerate(samples)
    ]
    result = run_kvpress(
        folder,
        requests,
        presses=list(presses),
        keep_ratios=config.budgets,
        num_threads=torch.get_num_threads(),
    )
    by_id = {r["id"]: s for r, s in zip(requests, samples, strict=True)}
    full_prefill = {
        row["id"]: row["prefill_seconds"]
        for row in result["rows"]
        if row["press"] == "full" and not row.get("error") and row["prefill_seconds"] > 0
    }
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in result["rows"]:
        if row["press"] == "full" or row.get("error"):
            continue
        groups.setdefault((row["press"], float(row["keep_ratio"])), []).append(row)
    records = []
    for (press, keep), rows in sorted(groups.items()):
        scores = [
            score_sample(by_id[r["id"]], postprocess(r["prediction"], by_id[r["id"]].answer_prefix))
            for r in rows
        ]
        records.append(
            {
                "source": "kvpress",
                "kvpress_version": result["kvpress_version"],
                "transformers_version": result["transformers_version"],
                "setting": setting,
                "task": task,
                "length": length,
                "method": press,
                "budget": keep,
                "num_samples": len(rows),
                "score": mean_of(scores),
                "kl": mean_of(r.get("kl") for r in rows),
                "top1": mean_of(r.get("top1_agreement") for r in rows),
                # the tensors kvpress really holds; masking presses (AdaKV, KVzip) keep full-size tensors
                "cache_bytes": mean_of(r["cache_bytes"] for r in rows),
                "effective_cache_bytes": mean_of(
                    r.get("effective_cache_bytes", r["cache_bytes"]) for r in rows
                ),
                "full_cache_bytes": mean_of(r["full_cache_bytes"] for r in rows),
                # one-token steps after the question, as kvsqueeze's rows measure them
                "decode_tokens_per_second": mean_of(
                    (r["new_tokens"] - 1) / r["step_seconds"] for r in rows if r.get("step_seconds")
                ),
                "prefill_tokens_per_second": mean_of(
                    r["context_tokens"] / r["prefill_seconds"] for r in rows if r.get("prefill_seconds")
                ),
                "peak_rss_bytes": result.get("peak_rss_bytes"),  # the kvpress worker process
                # extra prefill cost over a plain prefill; shared-prefill rows report what their own
                # standalone prefill would cost (see kvsqueeze.bench.kvpress_env)
                "compression_overhead": mean_of(
                    r["prefill_seconds"] / full_prefill[r["id"]] - 1 for r in rows if r["id"] in full_prefill
                ),
                "prefill_shared": any(r.get("prefill_shared") for r in rows),
                "errors": [],
                # per sample, so a kvsqueeze row can be paired with this one (kvsqueeze.bench.report)
                "samples": [
                    {
                        "sample_id": r["id"],
                        "prediction": r["prediction"],
                        "score": score,
                        "kl": r.get("kl"),
                        "top1": r.get("top1_agreement"),
                    }
                    for r, score in zip(rows, scores, strict=True)
                ],
            }
        )
    errors = [row for row in result["rows"] if row.get("error")]
    return {
        "records": records,
        "errors": errors,
        "versions": {k: v for k, v in result.items() if k != "rows"},
    }


def _teacher_ids(out: Path, setting: str, task: str, length: int) -> dict[str, list[int]]:
    path = run_path(out, setting, task, length, "full", 1.0)
    if not path.exists():
        return {}
    return {s["sample_id"]: s.get("teacher_ids", []) for s in json.loads(path.read_text())["samples"]}
