"""What each method keeps of a planted fact: the share of the needle's tokens (and of the question's) still in
the cache after compression, on the benchmark's 4k needle tasks, and write its block in docs/RESULTS.md.

    .venv/bin/python scripts/kept_needle_report.py            # measure and print the table
    .venv/bin/python scripts/kept_needle_report.py --write    # and replace the kept_needle block
    .venv/bin/python scripts/kept_needle_report.py --samples 3 --settings query_aware,query_agnostic

The samples are the benchmark's own (``kvsqueeze.bench.tasks``, seed 0, ``pydocs`` haystack, 4096 tokens):
the needle tasks, whose facts "One of the special magic numbers for KEY is: VALUE." are planted at known
places. Each sample is encoded as the benchmark encodes it (``encode_sample``), prefilled once into a
recording full cache, and every method compresses a fork of it at keep 0.25, as in the benchmark (the
forks share the prompt's column sums, ``reuse_attention=True``: the same rows, computed once). The
token positions of the queried needles' values, of their whole sentences and of the question come from the
tokenizer's character offsets; the rows each layer keeps per KV head come from the cache itself
(``SqueezeLayer.kept_positions``). A span's kept share is averaged over layers and KV heads, then over the
samples. Beside it, each method's benchmark score on the same samples where a run record has it
(``docs/bench/runs``, ``docs/bench/repeats``), in the same setting at the same keep ratio.

The default setting is ``query_aware`` (the question ends the compressed prompt, so its share is measured
too). Samples go index by index over the tasks (sample 0 of each first), and the run stops starting samples
that would end after ``--max-minutes`` (default 25); the block lists the samples measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

import kvsqueeze
from kvsqueeze import SqueezeCache
from kvsqueeze.bench import generate_samples
from kvsqueeze.bench.prompts import SETTINGS, encode_sample
from kvsqueeze.bench.report import mean_of, replace_block
from kvsqueeze.bench.tasks import Sample

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "bench"
MODEL = "qwen2.5-coder-0.5b"
LENGTH = 4096
KEEP = 0.25
# the needle tasks of the benchmark (kvsqueeze.bench.tasks.NeedleTask), one sample each by default
NEEDLE_TASKS = (
    "niah_single_number",
    "niah_multikey",
    "niah_single_word",
    "niah_multivalue",
    "niah_multiquery",
    "niah_single_uuid",
)
METHODS = ("full", "streaming_llm", "snapkv", "cake", "h2o", "d2o", "prefixkv", "kvzip", "kvzap")
SPANS = ("value", "sentence", "question")


@dataclass(frozen=True)
class Spans:
    """Token positions (in the compressed prompt) of what a sample plants and asks."""

    value: list[int]  # the queried needles' values: what the answer copies
    sentence: list[int]  # the queried needles' whole sentences (key and value)
    question: list[int]  # the question (empty when it is not in the compressed prompt)


def char_spans(sample: Sample, text: str) -> dict[str, list[tuple[int, int]]]:
    """Character ranges in ``text`` (the compressed prompt's text) of the values, sentences and question."""
    start = text.index(sample.context)
    values, sentences = [], []
    for value in sample.answers:
        match = re.search(
            r"One of the special magic \w+ for [\w-]+ is: " + re.escape(value) + r"\.", sample.context
        )
        if match is None:
            raise ValueError(f"needle with value {value!r} not found in the {sample.task} context")
        sentences.append((start + match.start(), start + match.end()))
        value_start = start + match.end() - 1 - len(value)
        values.append((value_start, value_start + len(value)))
    question = []
    at = text.find(sample.question, start + len(sample.context))
    if at >= 0:
        question.append((at, at + len(sample.question)))
    return {"value": values, "sentence": sentences, "question": question}


def token_spans(
    tokenizer: PreTrainedTokenizerBase, sample: Sample, setting: str
) -> tuple[torch.Tensor, Spans]:
    """The compressed prompt's ids (1, L), as the benchmark encodes them, and the token positions of its spans."""
    encoded = encode_sample(tokenizer, sample, setting)
    user = sample.context + "\n\n" + sample.question
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    split = text.index(sample.context) + len(sample.context)
    if setting == "query_aware":
        split = text.index(sample.question, split) + len(sample.question)
    text = text[:split]
    tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if tokens["input_ids"] != encoded.compressed_ids[0].tolist():
        raise ValueError("the offsets' tokenization differs from the benchmark's encoding")
    offsets = tokens["offset_mapping"]
    positions = {}
    for name, ranges in char_spans(sample, text).items():
        positions[name] = sorted(
            {i for a, b in ranges for i, (s, e) in enumerate(offsets) if s < b and e > a}
        )
    return encoded.compressed_ids, Spans(**positions)


def kept_share(cache: SqueezeCache, positions: list[int]) -> float:
    """Share of ``positions`` kept, averaged over every layer and KV head (sequence 0); NaN if none."""
    if not positions:
        return float("nan")
    wanted = set(positions)
    shares = [
        len(wanted.intersection(head)) / len(wanted)
        for layer in cache.layers
        for head in layer.kept_positions()[0]
    ]
    return sum(shares) / len(shares)


def bench_scores(setting: str, length: int) -> dict[tuple[str, str], float]:
    """Benchmark scores by (method, sample id) at KEEP (full: 1) from the run records on disk."""
    scores: dict[tuple[str, str], float] = {}
    for folder in (BENCH / "repeats" / "runs", BENCH / "runs"):  # the grid's own records win
        for method in METHODS:
            budget = 1 if method == "full" else KEEP
            for path in folder.glob(f"{setting}/niah_*/{length}/{method}@{budget:g}.json"):
                for outcome in json.loads(path.read_text())["samples"]:
                    scores[(method, outcome["sample_id"])] = outcome["score"]
    return scores


@torch.inference_mode()
def measure(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    samples: int,
    settings: list[str],
    length: int = LENGTH,
    deadline: float = float("inf"),
) -> tuple[dict[str, dict[str, dict[str, list[float]]]], list[str]]:
    """``shares[setting][method][span]``: the kept share of each sample (and ``score``: its benchmark score,
    NaN without a run record), and the ids of the samples measured. Samples go index by index over the
    tasks (sample 0 of every task first); after the first, none starts that would end after ``deadline``
    (a ``time.perf_counter()``) if it took as long as the slowest so far."""
    shares = {s: {m: {span: [] for span in (*SPANS, "score")} for m in METHODS} for s in settings}
    scores = {setting: bench_scores(setting, length) for setting in settings}
    drawn = {
        task: generate_samples(task, tokenizer, length=length, num_samples=samples, seed=0, haystack="pydocs")
        for task in tasks
    }
    measured: list[str] = []
    longest = 0.0  # seconds the slowest sample took
    for index in range(samples):
        for task in tasks:
            if measured and time.perf_counter() + longest > deadline:
                return shares, measured  # the next sample would likely end after the deadline
            began = time.perf_counter()
            sample_id = f"{task}-{length}-{index}"
            for setting in settings:
                ids, spans = token_spans(tokenizer, drawn[task][index], setting)
                source = SqueezeCache(model, "full", record_prefill=True, tokenizer=tokenizer)
                model(ids, cache=source, logits_to_keep=1)
                for method in METHODS:
                    started = time.perf_counter()
                    cache = source.fork(method, KEEP, reuse_attention=True)  # same rows, one walk
                    row = shares[setting][method]
                    for span in SPANS:
                        row[span].append(kept_share(cache, getattr(spans, span)))
                    row["score"].append(scores[setting].get((method, sample_id), float("nan")))
                    print(
                        f"{setting} {sample_id} {method}: value {row['value'][-1]:.2f} question "
                        f"{row['question'][-1]:.2f} ({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
                    del cache
                del source
            measured.append(sample_id)
            longest = max(longest, time.perf_counter() - began)
    return shares, measured


def _pct(value: float) -> str:
    return "–" if value != value else f"{100 * value:.0f}"


def table(shares: dict[str, dict[str, list[float]]]) -> str:
    """One row per method: kept shares in % of the value, sentence and question tokens, and the score."""
    lines = [
        "| method | needle value kept | needle sentence kept | question kept | bench score (same samples) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method, row in shares.items():
        scored = [s for s in row["score"] if s == s]
        score = f"{_pct(mean_of(scored))} ({len(scored)})" if scored else "–"
        cells = [_pct(mean_of(row[span])) for span in SPANS]
        lines.append(f"| {method} | {' | '.join(cells)} | {score} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the kept_needle block in docs/RESULTS.md"
    )
    parser.add_argument("--tasks", default=",".join(NEEDLE_TASKS), help="needle tasks (comma list)")
    parser.add_argument("--samples", type=int, default=1, help="samples per task (default 1: sample 0)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=25.0,
        help="end within about this many minutes: no sample starts that would end later if it took as long "
        "as the slowest so far (default 25; the block says which samples ran)",
    )
    parser.add_argument("--settings", default="query_aware", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--model", default=MODEL, help=f"model alias or path (default {MODEL})")
    parser.add_argument("--length", type=int, default=LENGTH, help=f"context tokens (default {LENGTH})")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    if unknown := set(tasks) - set(NEEDLE_TASKS):
        raise SystemExit(
            f"not a needle task: {sorted(unknown)[0]!r}; needle tasks: {', '.join(NEEDLE_TASKS)}"
        )
    settings = [s for s in args.settings.split(",") if s]
    if unknown := set(settings) - set(SETTINGS):
        raise SystemExit(f"unknown setting {sorted(unknown)[0]!r}; settings: {', '.join(SETTINGS)}")
    started = time.perf_counter()
    model, tokenizer = kvsqueeze.load_model(args.model)
    deadline = started + 60 * args.max_minutes
    shares, measured = measure(model, tokenizer, tasks, args.samples, settings, args.length, deadline)
    wall = time.perf_counter() - started
    command = " ".join([".venv/bin/python", "scripts/kept_needle_report.py", *sys.argv[1:]])
    lines = [
        f"Model `{args.model}` (fp32), the benchmark's {args.length}-token needle samples (seed 0, `pydocs` "
        f"haystack), keep {KEEP:g}. Command: `{command}`. Samples measured ({len(measured)} of the "
        f"{args.samples * len(tasks)} asked; the run stops within about {args.max_minutes:g} min): "
        f"{', '.join(measured) or 'none'}.",
        "",
        "Kept = the share of the span's tokens still stored after compression, averaged over layers, KV heads "
        "and samples (from the cache's own kept positions). Needle value: the digits, uuid or word the answer "
        "copies; needle sentence: the whole planted sentence, key included; question: only in the compressed "
        "prompt when query-aware. Bench score: the benchmark's score of that method at the same keep ratio on "
        "the same samples (in brackets, how many samples have a run record).",
    ]
    for setting, by_method in shares.items():
        lines += ["", f"**{setting}**", "", table(by_method)]
    lines += ["", f"Wall time of this report: {wall:.0f} s."]
    body = "\n".join(lines)
    print(body)
    if args.write:
        replace_block(ROOT / "docs" / "RESULTS.md", "kept_needle", body)


if __name__ == "__main__":
    main()
