"""The offline benchmark: methods x budgets x tasks x context lengths on one model.

For every sample the context is prefilled **once** into a recording full cache; every method and budget is
then a :meth:`~kvsqueeze.cache.SqueezeCache.fork` of it (prefill once, compress many). Each (method,
budget) gets:

* the answer, decoded greedily from its own cache, scored against the sample's answers;
* fidelity that needs no answers: mean KL(full || compressed) and top-1 agreement of the next-token
  distributions over a teacher-forced continuation (the full cache's own greedy continuation);
* stored bytes of the compressed context (from the tensors, as kvpress reports them), decode tokens/s,
  and the compression overhead (time spent scoring and selecting, as a share of the shared prefill).

Results go to ``<out>/runs/<setting>/<task>/<length>/<method>@<budget>.json``, rewritten after every
sample; a run resumes from the samples its JSON holds, so an interrupted benchmark goes on where it stopped
and a larger ``num_samples`` computes only the new samples.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.bench.prompts import SETTINGS, EncodedSample, encode_sample
from kvsqueeze.bench.report import mean_of
from kvsqueeze.bench.scoring import postprocess, score_sample
from kvsqueeze.bench.tasks import TASKS, Sample, generate_samples, get_task
from kvsqueeze.cache import Budget, SqueezeCache
from kvsqueeze.memory import peak_rss, release_freed_memory, reset_peak_rss
from kvsqueeze.methods import Method, get_method, with_profile


@dataclass(frozen=True)
class MethodSpec:
    """One row family of the table: a method name, its hyperparameters, and the label it is shown as."""

    name: str
    params: dict = field(default_factory=dict)
    profile: str | None = None  # a layer profile JSON (``kvsqueeze profile``) replacing its layer budgets
    budgets: tuple[float, ...] | None = None  # keep ratios of this method only (None: the config's)

    @classmethod
    def parse(cls, text: str, profile: str | None = None) -> MethodSpec:
        """``h2o`` or ``h2o:recent_share=0.3:window=16`` (the bench's ``--methods`` syntax), each value read
        by the method's field type (a one-line ``ValueError`` for a malformed or mistyped one)."""
        from kvsqueeze.cli.params import coerce_params, parse_assignment

        name, *params = text.split(":")
        raw = dict(parse_assignment(p) for p in params)
        return cls(name.strip(), coerce_params(name, raw), profile=profile)

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        label = f"{self.name}({extra})" if extra else self.name
        # the profile file's name tells two profiles of one method apart (their records differ)
        return f"{label}+{Path(self.profile).stem}" if self.profile else label

    def build(self) -> Method:
        """The method this spec names (a one-line ``ValueError`` for unknown names or parameters)."""
        method = get_method(self.name, **self.params)
        return with_profile(method, self.profile) if self.profile else method


@dataclass
class BenchConfig:
    """What to run. ``budgets`` are keep ratios in (0, 1]."""

    methods: list[MethodSpec]
    budgets: list[float]
    tasks: list[str]
    lengths: list[int]
    num_samples: int = 5
    seed: int = 0
    haystack: str = "pydocs"
    settings: list[str] = field(default_factory=lambda: ["query_agnostic"])
    max_new_tokens: int | None = None  # None: each task's own answer length
    fidelity_tokens: int = 64

    def validate(self, max_positions: int | None, check_tasks: bool = True) -> None:
        """One-line ``ValueError`` for anything unknown or out of range, before any model work."""
        for task in self.tasks if check_tasks else ():
            get_task(task)
        for spec in self.methods:
            spec.build()
        for budget in [*self.budgets, *(b for spec in self.methods for b in spec.budgets or ())]:
            Budget.parse(float(budget))
        for setting in self.settings:
            if setting not in SETTINGS:
                raise ValueError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
        if max_positions is not None:
            extra = max(self.max_new_tokens or 128, self.fidelity_tokens)  # answer or teacher tokens
            too_long = [n for n in self.lengths if n + extra > max_positions]
            if too_long:
                raise ValueError(f"length {too_long[0]} exceeds the model's {max_positions} positions")


@dataclass
class SampleOutcome:
    """One sample under one (method, budget)."""

    sample_id: str
    prediction: str
    raw_output: str  # the decoded reply before postprocessing, so runs can be re-scored
    score: float
    kl: float
    top1: float
    cache_bytes: int
    full_cache_bytes: int
    decode_tokens_per_second: float
    compression_seconds: float
    prefill_seconds: float
    peak_rss_bytes: (
        int  # while compressing, answering and teacher forcing (model and shared prefill included)
    )
    teacher_ids: list[int] = field(default_factory=list)  # the full cache's continuation (full rows only)
    prompt_tokens: int = 0  # tokens compressed (0 in records written before it was kept)
    # False in records written before 2026-12-08: each run's answer cache deep-copied the model, and the
    # peak window opened with the last run's caches still held, so their peaks run one or more models high
    peak_rss_own: bool = False


def greedy(
    model: PreTrainedModel, cache: Cache, followup: torch.Tensor, steps: int, eos: set[int]
) -> tuple[list[int], float]:
    """Feed ``followup`` to a prefilled ``cache``, then decode greedily (up to ``steps`` tokens, stopping
    after any of ``eos``); returns the new token ids and the decode tokens/s."""
    out = model(followup, cache=cache)
    token = out.logits[:, -1:].argmax(-1)
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(steps - 1):
        if tokens[-1] in eos:
            break
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    elapsed = time.perf_counter() - start
    rate = (len(tokens) - 1) / elapsed if len(tokens) > 1 and elapsed > 0 else float("nan")
    return tokens, rate


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end an answer: the tokenizer's and the generation config's end-of-sequence."""
    ids = [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
    return {int(x) for t in ids if t is not None for x in (t if isinstance(t, list) else [t])}


def continuation_logprobs(
    model: PreTrainedModel, cache: SqueezeCache, ids: torch.Tensor, stepwise: bool, chunk: int = 1
) -> torch.Tensor:
    """Next-token log-probabilities after each token of ``ids`` (1, T), (T, V) fp32; ``cache`` advances.

    Prefill-only methods take ``ids`` in one call (their cache does not change while decoding, so this equals
    feeding them one by one); per-step methods (H2O) take the first ``chunk`` tokens in one call (a question)
    and the rest token by token, evicting as they go.
    """
    if not stepwise:
        return torch.log_softmax(model(ids, cache=cache).logits[0].float(), dim=-1)
    rows = list(model(ids[:, :chunk], cache=cache).logits[0])
    rows += [model(ids[:, i : i + 1], cache=cache).logits[0, -1] for i in range(chunk, ids.shape[1])]
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


def _teacher_logprobs(
    model: PreTrainedModel, cache: SqueezeCache, followup: torch.Tensor, teacher: list[int], stepwise: bool
) -> torch.Tensor:
    """Next-token log-probabilities over the teacher continuation after ``followup``, (len(teacher), V)."""
    if not teacher:
        return torch.empty(0)
    ids = torch.cat([followup, torch.tensor([teacher[:-1]], dtype=torch.long)], dim=1)
    return continuation_logprobs(model, cache, ids, stepwise, chunk=followup.shape[1])[
        followup.shape[1] - 1 :
    ]


def fidelity(full_logprobs: torch.Tensor, logprobs: torch.Tensor) -> tuple[float, float]:
    """Mean KL(full || compressed) and top-1 agreement over aligned next-token log-probabilities (T, V)."""
    if full_logprobs.numel() == 0:
        return float("nan"), float("nan")
    kl = (full_logprobs.exp() * (full_logprobs - logprobs)).sum(-1).clamp(min=0)
    agree = (full_logprobs.argmax(-1) == logprobs.argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


@torch.inference_mode()
def run_sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: Sample,
    encoded: EncodedSample,
    runs: list[tuple[MethodSpec, float]],
    max_new_tokens: int,
    fidelity_tokens: int,
    sample_id: str,
    on_run: Callable[[], None] | None = None,
) -> dict[tuple[str, float], SampleOutcome]:
    """Every (method, budget) of ``runs`` on one sample, from one shared prefill; ``on_run`` is called
    after each of them (a progress bar's tick)."""
    eos = stop_ids(model, tokenizer)
    source = SqueezeCache(model, "full", record_prefill=True, tokenizer=tokenizer)
    start = time.perf_counter()
    model(encoded.compressed_ids, cache=source, logits_to_keep=1)  # no (L, vocab) logits: unused
    prefill = time.perf_counter() - start

    # The full cache's own greedy continuation is the teacher for everyone's fidelity.
    teacher, _ = greedy(model, source.fork("full"), encoded.followup_ids, fidelity_tokens, set())
    reference = _teacher_logprobs(model, source.fork("full"), encoded.followup_ids, teacher, stepwise=False)
    results: dict[tuple[str, float], SampleOutcome] = {}
    for spec, budget in runs:
        method = spec.build()
        cache = answer_cache = None  # the last run's caches, and the heap pages they held, are not this run's
        release_freed_memory()
        reset_peak_rss()
        cache = source.fork(method, budget)
        compression = cache.compression_seconds()  # scoring + selection only, not the fork's copy
        stored, full_bytes = cache.nbytes(), cache.full_nbytes()  # the compressed context, as kvpress reports
        answer_cache = cache.copy()  # the same compressed rows (the model is shared); scoring again is waste
        tokens, rate = greedy(model, answer_cache, encoded.followup_ids, max_new_tokens, eos)
        raw = tokenizer.decode(tokens, skip_special_tokens=True)
        prediction = postprocess(raw, sample.answer_prefix)
        stepwise = method.components().decodes_stepwise
        kl, top1 = fidelity(
            reference, _teacher_logprobs(model, cache, encoded.followup_ids, teacher, stepwise)
        )
        results[(spec.label, budget)] = SampleOutcome(
            sample_id=sample_id,
            prediction=prediction,
            raw_output=raw,
            score=score_sample(sample, prediction),
            kl=kl,
            top1=top1,
            cache_bytes=stored,
            full_cache_bytes=full_bytes,
            decode_tokens_per_second=rate,
            compression_seconds=compression,
            prefill_seconds=prefill,
            peak_rss_bytes=peak_rss(),
            peak_rss_own=True,
            teacher_ids=teacher if spec.name == "full" else [],
            prompt_tokens=encoded.compressed_ids.shape[1],
        )
        if on_run is not None:
            on_run()
    return results


def run_path(out: Path, setting: str, task: str, length: int, label: str, budget: float) -> Path:
    """Where the record of one (setting, task, length, method label, budget) run lives under ``out``."""
    return out / "runs" / setting / task / str(length) / f"{label}@{budget:g}.json"


def iterate_runs(config: BenchConfig) -> list[tuple[MethodSpec, float]]:
    """All (method, budget) pairs: each method at its own budgets, else the config's; methods the budget does
    not change (full, pure quantization) run once, at 1."""
    runs: list[tuple[MethodSpec, float]] = []
    for spec in config.methods:
        budgets = (spec.budgets or config.budgets) if spec.build().uses_budget else [1.0]
        runs.extend((spec, float(b)) for b in budgets)
    if not any(spec.name == "full" for spec, _ in runs):
        runs.insert(0, (MethodSpec("full"), 1.0))
    return runs


def answer_tokens(config: BenchConfig, task: str) -> int:
    """Tokens to generate for an answer: the config's cap, else the task's own (RULER-style) length."""
    return config.max_new_tokens or (TASKS[task].answer_tokens if task in TASKS else 32)


def generated_samples(
    config: BenchConfig, tokenizer: PreTrainedTokenizerBase
) -> Callable[[str, int], list[Sample]]:
    """The samples of a (task, length) group: generated from the config's seed, so every caller sees the same."""

    def make(task: str, length: int) -> list[Sample]:
        return generate_samples(
            task,
            tokenizer,
            length=length,
            num_samples=config.num_samples,
            seed=config.seed,
            haystack=config.haystack,
        )

    return make


def run_bench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: BenchConfig,
    out: Path,
    *,
    model_name: str = "",
    samples_for: Callable[[str, int], list[Sample]] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run (or resume) the benchmark; returns one summary record per (setting, task, length, method, budget).

    Samples run in rounds: sample 0 of every group, then sample 1 of every group, ..., and each record is
    written after every sample it gains. An interrupted run loses at most the sample it was in, leaves every
    group within one sample of the others, and a later run with more samples computes only the new ones.
    """
    from tqdm.auto import tqdm

    text_config = model.config.get_text_config(decoder=True)
    config.validate(getattr(text_config, "max_position_embeddings", None), check_tasks=samples_for is None)
    runs = iterate_runs(config)
    make_samples = samples_for or generated_samples(config, tokenizer)
    groups = [(s, t, n) for s in config.settings for t in config.tasks for n in config.lengths]
    outcomes = {  # what each run of each group has so far, in sample order
        group: {(spec.label, b): _recorded_outcomes(run_path(out, *group, spec.label, b)) for spec, b in runs}
        for group in groups
    }
    pending = {
        (task, length)
        for (setting, task, length) in groups
        if config.num_samples is None
        or any(len(o) < config.num_samples for o in outcomes[(setting, task, length)].values())
    }
    # The samples of every (task, length) with runs to do, made before the first run (settings share
    # them) so the progress bar knows its total: one tick per (method, budget) run of a sample.
    sample_sets = {
        (t, n): make_samples(t, n) for t in config.tasks for n in config.lengths if (t, n) in pending
    }
    wanted = {  # samples each group's runs end with
        g: len(sample_sets[g[1:]]) if g[1:] in pending else max(map(len, outcomes[g].values()))
        for g in groups
    }
    total = sum(max(wanted[g], len(o)) for g in groups for o in outcomes[g].values())
    done = sum(min(wanted[g], len(o)) for g in groups for o in outcomes[g].values())
    bar = tqdm(total=total, initial=done, disable=not progress, desc="bench", unit="run")
    for index in range(max(wanted.values(), default=0)):
        for group in groups:
            setting, task, length = group
            left = [(spec, b) for spec, b in runs if len(outcomes[group][(spec.label, b)]) == index]
            if index >= wanted[group] or not left or group[1:] not in pending:
                continue
            sample = sample_sets[(task, length)][index]
            results = run_sample(
                model,
                tokenizer,
                sample,
                encode_sample(tokenizer, sample, setting),
                left,
                answer_tokens(config, task),
                config.fidelity_tokens,
                f"{task}-{length}-{index}",
                on_run=lambda: bar.update(1),
            )
            for spec, budget in left:
                so_far = outcomes[group][(spec.label, budget)]
                so_far.append(results[(spec.label, budget)])
                record = _summarize(so_far, setting, task, length, spec, budget, model_name, config)
                path = run_path(out, setting, task, length, spec.label, budget)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=1))
    bar.close()
    return [
        record
        for setting, task, length in groups
        for record in _load_records(out, setting, task, length, runs, config.num_samples)
    ]


def _recorded_outcomes(path: Path) -> list[SampleOutcome]:
    """The samples a run record holds (none if it was never written)."""
    if not path.exists():
        return []
    return [SampleOutcome(**sample) for sample in json.loads(path.read_text())["samples"]]


def _summarize(
    outcomes: list[SampleOutcome],
    setting: str,
    task: str,
    length: int,
    spec: MethodSpec,
    budget: float,
    model_name: str,
    config: BenchConfig,
) -> dict:
    import kvsqueeze

    return {
        "source": "kvsqueeze",
        "version": kvsqueeze.__version__,
        "model": model_name,
        "setting": setting,
        "task": task,
        "length": length,
        "method": spec.label,
        "budget": budget,
        "seed": config.seed,
        "haystack": config.haystack,
        **_statistics(outcomes, length),
    }


def _statistics(outcomes: list[SampleOutcome], length: int) -> dict:
    """A record's figures over its samples, and the samples themselves."""
    prefill = mean_of(o.prefill_seconds for o in outcomes)
    # a --dataset run has no one length (0): its prompts' own token counts tell the prefill rate
    tokens = mean_of(o.prompt_tokens for o in outcomes) if length == 0 else length
    return {
        "num_samples": len(outcomes),
        "prompt_tokens": tokens,
        "score": mean_of(o.score for o in outcomes),
        "kl": mean_of(o.kl for o in outcomes),
        "top1": mean_of(o.top1 for o in outcomes),
        "cache_bytes": mean_of(o.cache_bytes for o in outcomes),
        "full_cache_bytes": mean_of(o.full_cache_bytes for o in outcomes),
        "decode_tokens_per_second": mean_of(o.decode_tokens_per_second for o in outcomes),
        "prefill_tokens_per_second": tokens / prefill if prefill > 0 else float("nan"),
        "compression_overhead": mean_of(o.compression_seconds for o in outcomes) / prefill
        if prefill > 0
        else 0.0,
        "peak_rss_bytes": max(o.peak_rss_bytes for o in outcomes),
        "peak_rss_own": all(o.peak_rss_own for o in outcomes),
        "samples": [asdict(o) for o in outcomes],
    }


def load_records(config: BenchConfig, out: Path) -> list[dict]:
    """The records of ``config`` already written under ``out`` (all of them once a run has finished), each
    cut to the config's first ``num_samples`` samples if it holds more."""
    runs = iterate_runs(config)
    return [
        record
        for setting in config.settings
        for task in config.tasks
        for length in config.lengths
        for record in _load_records(out, setting, task, length, runs, config.num_samples)
    ]


def _load_records(
    out: Path,
    setting: str,
    task: str,
    length: int,
    runs: list[tuple[MethodSpec, float]],
    num_samples: int | None,
) -> list[dict]:
    records = []
    for spec, budget in runs:
        path = run_path(out, setting, task, length, spec.label, budget)
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        if num_samples is not None and record["num_samples"] > num_samples:
            first = [SampleOutcome(**sample) for sample in record["samples"][:num_samples]]
            record = {**record, **_statistics(first, record["length"])}
        records.append(record)
    return records
