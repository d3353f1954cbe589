"""What each ``kvsqueeze`` subcommand does. Model imports are deferred so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from kvsqueeze.cli.demo_text import DEMO_QUESTION, demo_document

if TYPE_CHECKING:
    from kvsqueeze.bench.tasks import Sample
    from kvsqueeze.methods import Method


def _read_prompt(args: argparse.Namespace) -> str:
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        return path.read_text(encoding="utf-8")
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no prompt: pass it as an argument, with --file, or on stdin")
    return sys.stdin.read()


DTYPES = ("float32", "bfloat16", "float16")  # --dtype: torch dtypes by name (torch loads later)


def _load(args: argparse.Namespace):
    import torch

    from kvsqueeze.models import DEFAULT_MODEL, load_model

    return load_model(args.model or DEFAULT_MODEL, dtype=getattr(torch, getattr(args, "dtype", "float32")))


def _method(args: argparse.Namespace) -> Method:
    """The method of ``--method`` with its ``-p NAME=VALUE`` parameters, each read as its field's type."""
    from kvsqueeze.cli.params import coerce_params
    from kvsqueeze.methods import get_method

    return get_method(args.method, **coerce_params(args.method, dict(args.param)))


def run_generate(args: argparse.Namespace) -> int:
    from kvsqueeze.cache import Budget
    from kvsqueeze.generation import generate
    from kvsqueeze.methods import with_profile

    prompt = _read_prompt(args)
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    method = _method(args)  # validate before the model loads
    if args.profile:
        method = with_profile(method, args.profile)
    budget = Budget.parse(args.budget)
    model, tokenizer = _load(args)
    result = generate(
        model,
        tokenizer,
        prompt,
        method,
        budget,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
    )
    print(result.text)
    print(result.summary(), file=sys.stderr)
    return 0


def run_methods(args: argparse.Namespace) -> int:
    from kvsqueeze.methods import METHODS, hyperparameters

    for name in sorted(METHODS):
        cls = METHODS[name]
        fields = hyperparameters(cls)
        params = ", ".join(f"{f.name}={f.default!r}" for f in fields) or "-"
        print(f"{name:<15} {cls.summary}")
        print(f"{'':<15} params: {params}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from kvsqueeze.models import list_models

    rows = list_models()
    width = max(len(row.alias) for row in rows)
    for row in rows:
        state = "installed" if row.installed else "not installed"
        print(f"{row.alias:<{width}}  {state:<13}  {row.description}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from kvsqueeze.generation import format_bytes
    from kvsqueeze.models import DEFAULT_MODEL
    from kvsqueeze.text_config import head_dim_of, layer_types_of

    model, _ = _load(args)
    cfg = model.config.get_text_config(decoder=True)
    head_dim, layer_types = head_dim_of(cfg), layer_types_of(cfg)
    sliding = sum(t == "sliding_attention" for t in layer_types)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    rows = [
        ("model", args.model or DEFAULT_MODEL),
        ("architecture", cfg.model_type),
        (
            "layers",
            f"{cfg.num_hidden_layers}"
            + (f" ({sliding} sliding over {cfg.sliding_window})" if sliding else ""),
        ),
        ("attention heads", cfg.num_attention_heads),
        (
            "KV heads",
            f"{cfg.num_key_value_heads} (group of {cfg.num_attention_heads // cfg.num_key_value_heads})",
        ),
        ("head dim", head_dim),
        ("max context", cfg.max_position_embeddings),
        ("dtype", str(model.dtype).replace("torch.", "")),
        ("KV bytes per token", f"{per_token:,} ({format_bytes(per_token)})"),
        ("KV bytes at max context", format_bytes(per_token * cfg.max_position_embeddings)),
    ]
    for key, value in rows:
        print(f"{key:<24} {value}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from kvsqueeze.cache import Budget
    from kvsqueeze.generation import format_bytes, generate

    method = _method(args)
    budget = Budget.parse(args.budget)
    print("kvsqueeze demo: one long prompt, answered with the full KV cache and with compressed ones.")
    model, tokenizer = _load(args)
    prompt = demo_document() + "\n\n" + DEMO_QUESTION
    configs = [("full cache", "full", Budget.parse(1.0)), (f"{method.name} @ {budget}", method, budget)]
    if method.name != "streaming_llm":  # the naive baseline at the same budget, to show what the method buys
        configs.append((f"streaming_llm @ {budget}", "streaming_llm", budget))
    runs = [
        (label, generate(model, tokenizer, prompt, m, b, max_new_tokens=args.max_new_tokens))
        for label, m, b in configs
    ]
    print(f"\nprompt: {runs[0][1].prompt_tokens[0]} tokens of meeting notes, then: {DEMO_QUESTION!r}\n")
    width = 34
    print(f"{'':<14}" + "".join(f"{name:<{width}}" for name, _ in runs))
    wrapped = [textwrap.wrap(r.text.strip().replace("\n", " "), width - 2) or [""] for _, r in runs]
    for i in range(max(len(w) for w in wrapped)):
        head = "answer" if i == 0 else ""
        print(f"{head:<14}" + "".join(f"{(w[i] if i < len(w) else ''):<{width}}" for w in wrapped))
    print(f"{'cache bytes':<14}" + "".join(f"{format_bytes(r.cache_bytes):<{width}}" for _, r in runs))
    print(f"{'vs full':<14}" + "".join(f"{r.memory_ratio:<{width}.1%}" for _, r in runs))
    print(f"{'decode tok/s':<14}" + "".join(f"{r.decode_tokens_per_second:<{width}.1f}" for _, r in runs))
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _method_specs(text: str, profile: str | None = None):
    """``snapkv,h2o:recent_share=0.3,pyramidkv:window=16`` -> MethodSpecs; ``all``: every method."""
    from kvsqueeze.bench.runner import MethodSpec
    from kvsqueeze.methods import METHODS

    if text.strip() == "all":
        return [MethodSpec(name, profile=profile) for name in sorted(METHODS)]
    return [MethodSpec.parse(item, profile) for item in _split(text)]


GENERATED_SAMPLES = 5
"""Samples per task and length that ``bench`` generates when ``--samples`` is not given."""


def _dataset_tasks(path: str, limit: int | None) -> dict[str, list[Sample]]:
    """The samples of a ``--dataset`` file by task (at most ``limit`` per task), said on stderr."""
    from kvsqueeze.bench.datasets import group_by_task, load_jsonl_dataset

    samples, errors = load_jsonl_dataset(path)
    for error in errors:
        print(f"kvsqueeze: skipped {path}: {error}", file=sys.stderr)
    by_task = group_by_task(samples, limit)
    total = sum(len(group) for group in by_task.values())
    counts = ", ".join(f"{task} ({len(group)})" for task, group in by_task.items())
    cap = f" (--samples {limit} per task, of {len(samples)})" if total < len(samples) else ""
    print(f"kvsqueeze: {path}: {total} samples{cap} in {len(by_task)} task(s): {counts}", file=sys.stderr)
    return by_task


def run_bench(args: argparse.Namespace) -> int:
    from kvsqueeze.bench import TASKS
    from kvsqueeze.bench.report import markdown_table, plot_results
    from kvsqueeze.bench.runner import BenchConfig, run_bench

    tasks = sorted(TASKS) if args.tasks == "all" else _split(args.tasks)
    settings = ["query_agnostic", "query_aware"] if args.setting == "both" else [args.setting]
    try:
        budgets = [float(b) for b in _split(args.budgets)]
        lengths = [int(n) for n in _split(args.lengths)]
    except ValueError:
        raise ValueError(
            "--budgets takes ratios like 0.1,0.25 and --lengths token counts like 4096"
        ) from None
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    num_samples = GENERATED_SAMPLES if args.samples is None else args.samples
    samples_for = None
    if args.dataset:
        by_task = _dataset_tasks(args.dataset, args.samples)
        tasks, lengths = list(by_task), [0]
        num_samples = max(len(group) for group in by_task.values())

        def samples_for(task: str, length: int) -> list[Sample]:
            return by_task[task]

    config = BenchConfig(
        methods=_method_specs(args.methods, args.profile),
        budgets=budgets,
        tasks=tasks,
        lengths=lengths,
        num_samples=num_samples,
        seed=args.seed,
        haystack=args.haystack,
        settings=settings,
        max_new_tokens=args.max_new_tokens,
        fidelity_tokens=args.fidelity_tokens,
    )
    config.validate(None, check_tasks=not args.dataset)  # names and ranges, before the model loads
    if args.baseline and args.baseline != "kvpress":
        raise ValueError(f"unknown baseline {args.baseline!r}; the only baseline is kvpress")
    model, tokenizer = _load(args)
    out = Path(args.out)
    records = run_bench(
        model, tokenizer, config, out, model_name=args.model or "smollm2-135m", samples_for=samples_for
    )
    if args.baseline == "kvpress":
        from kvsqueeze.bench.baseline import run_kvpress_baseline

        records += run_kvpress_baseline(tokenizer, config, out, args.model, samples_for=samples_for)
    tables = [f"## {s}\n\n{markdown_table(records, s)}" for s in settings]
    (out / "results.md").write_text("# kvsqueeze bench\n\n" + "\n\n".join(tables) + "\n")
    plots = plot_results(records, out / "plots")
    print("\n\n".join(tables))
    print(f"\nwrote {out / 'results.md'}, {len(plots)} plots and {len(records)} run records under {out}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from kvsqueeze.bench import generate_samples
    from kvsqueeze.bench.prompts import encode_sample
    from kvsqueeze.cache import Budget
    from kvsqueeze.methods import compute_profile

    method = _method(args)
    budget = Budget.parse(args.budget)
    if budget.ratio is None:
        raise ValueError("profile --budget must be a ratio in (0, 1], e.g. 0.5")
    model, tokenizer = _load(args)
    if args.prompts:
        texts = [t for t in Path(args.prompts).read_text().split("\n\n\n") if t.strip()]
        prompts = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
    else:  # generated long-context samples: documents and needles over natural text
        prompts = []
        for task in ("qa_generated", "niah_multikey", "variable_tracking"):
            for sample in generate_samples(
                task, tokenizer, length=args.length, num_samples=args.samples, seed=1
            ):
                prompts.append(encode_sample(tokenizer, sample, "query_aware").compressed_ids)
    profile = compute_profile(model, prompts, method, budget.ratio, model_name=args.model or "")
    out = Path(args.out or f"profile-{method.name}-{budget.ratio:g}.json")
    profile.save(out)
    ratios = ", ".join(f"{r:.2f}" for r in profile.keep_ratios)
    print(f"kept ratio per layer over {len(prompts)} prompts: {ratios}")
    print(f"wrote {out}; use it with --profile {out}")
    return 0
