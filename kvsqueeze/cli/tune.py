"""``kvsqueeze tune``: search per-layer budgets, or bit widths (``--bytes``), for one model and method
(EvoPress), resumably."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``tune`` subcommand."""
    from kvsqueeze.cli.main import _add_model, _add_params

    p = sub.add_parser(
        "tune",
        help="search per-layer keep ratios (or bits, with --bytes) by KL against the full cache on offline "
        "documents (EvoPress)",
    )
    _add_model(p)
    p.add_argument(
        "--method",
        default="snapkv",
        help="an evicting method, or with --bytes a quantizing one (default: snapkv)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="mean keep ratio in (0, 1) to split over layers (default: 0.1); with --bytes, the fixed keep "
        "ratio of an EVICTION+QUANTIZATION method",
    )
    p.add_argument(
        "--bytes",
        type=float,
        default=None,
        metavar="RATIO",
        help="search bits per layer (2, 4, 8; keys and values apart) of a quantizing method (kivi, zipcache) "
        "storing at most RATIO x an fp16 cache's bytes, e.g. 0.22",
    )
    _add_params(p)
    p.add_argument("--out", help="profile JSON (default: profile-<method>-<budget or bytesRATIO>-tuned.json)")
    p.add_argument("--documents", type=int, default=8, help="offline calibration documents (default: 8)")
    p.add_argument("--context-tokens", type=int, default=2048, help="context per document (default: 2048)")
    p.add_argument(
        "--continuation-tokens",
        type=int,
        default=32,
        help="teacher-forced tokens scored per document (default: 32)",
    )
    p.add_argument("--generations", type=int, default=40, help="search generations (default: 40)")
    p.add_argument("--offspring", type=int, default=16, help="children per generation (default: 16)")
    p.add_argument(
        "--steps-per-layer", type=int, default=4, help="budget steps a layer starts with (default: 4)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from kvsqueeze.cli.commands import _load, _method
    from kvsqueeze.tune import SearchConfig, check_bits_tunable, check_tunable, tune_bits, tune_profile

    method = _method(args)
    bits = args.bytes is not None
    budget = args.budget if args.budget is not None else (1.0 if bits else 0.1)
    if bits:  # before the model loads
        check_bits_tunable(method, args.bytes, budget)
    else:
        check_tunable(method, budget)
    for name in ("documents", "context_tokens", "continuation_tokens", "offspring", "steps_per_layer"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = SearchConfig(generations=args.generations, offspring=args.offspring, seed=args.seed)
    target = f"bytes{args.bytes:g}" if bits else f"{budget:g}"
    out = Path(args.out or f"profile-{method.name}-{target}-tuned.json")
    model, tokenizer = _load(args)
    common = dict(
        documents=args.documents,
        context_tokens=args.context_tokens,
        continuation_tokens=args.continuation_tokens,
        config=config,
        state_path=out.with_suffix(".state.json"),
        model_name=args.model or "",
    )
    if bits:
        profile, result = tune_bits(model, tokenizer, method, args.bytes, budget=budget, **common)
    else:
        profile, result = tune_profile(
            model, tokenizer, method, budget, steps_per_layer=args.steps_per_layer, **common
        )
    profile.save(out)
    start = "start" if bits else "uniform"
    print(
        f"KL {result.loss:.4f} ({start} {result.start_loss:.4f}) after {len(result.history)} generations, "
        f"{result.evaluations} evaluations, {result.seconds:.0f} s"
    )
    if bits:
        print(f"stored bytes {profile.search['stored_bytes']:.4f}x fp16 (at most {args.bytes:g})")
        print(f"key bits per layer: {', '.join(map(str, profile.key_bits))}")
        print(f"value bits per layer: {', '.join(map(str, profile.value_bits))}")
    else:
        print(f"keep ratio per layer: {', '.join(f'{r:.3f}' for r in profile.keep_ratios)}")
    print(f"wrote {out}; use it with --profile {out}")
    return 0
