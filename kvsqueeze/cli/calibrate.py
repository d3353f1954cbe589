"""``kvsqueeze calibrate``: fit a learned scorer (``kvzap``) for one model, offline and resumably."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvsqueeze.calibrate.fit import STUDENTS

LEARNED_METHODS = ("kvzap",)
TEACHERS = ("kvzip", "kvzip+")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``calibrate`` subcommand."""
    from kvsqueeze.cli.main import _add_model

    p = sub.add_parser(
        "calibrate",
        help="fit a learned scorer (kvzap) to native kvzip scores on offline documents (resumable)",
    )
    _add_model(p)  # --model, --dtype (the fitted weights serve the model in any dtype)
    p.add_argument("--method", default="kvzap", choices=LEARNED_METHODS, help="the learned method to fit")
    p.add_argument("--documents", type=int, default=48, help="calibration documents (default: 48)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per document (default: 2048)")
    p.add_argument("--held-out", type=int, default=4, help="documents held out to measure R^2 (default: 4)")
    p.add_argument("--ridge", type=float, default=1.0, help="ridge penalty of the linear fit (default: 1)")
    p.add_argument(
        "--teacher",
        default="kvzip",
        choices=TEACHERS,
        help="the scores fitted: kvzip's, or kvzip+'s (attention x ||W_O v|| / ||h||) (default: kvzip)",
    )
    p.add_argument(
        "--student",
        default="linear",
        choices=STUDENTS,
        help="the scorer fitted per layer: a ridge-fitted linear map, or a two-layer MLP (default: linear)",
    )
    p.add_argument("--mlp-hidden", type=int, default=64, help="hidden units of the MLP student (default: 64)")
    p.add_argument(
        "--mlp-rows", type=int, default=1024, help="rows of each document the MLP trains on (default: 1024)"
    )
    p.add_argument(
        "--out",
        help="weights file (default: the user cache, where kvzap finds it; kvzap:plus=true for --teacher kvzip+, "
        "kvzap:mlp=true for --student mlp)",
    )
    p.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from kvsqueeze.cli.commands import _load
    from kvsqueeze.models import DEFAULT_MODEL
    from kvsqueeze.models.fingerprint import model_fingerprint
    from kvsqueeze.weights import user_weights_path

    for name in ("documents", "tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.held_out < 1 or args.held_out >= args.documents:
        raise ValueError(f"--held-out must be in [1, --documents), got {args.held_out}")
    if args.ridge < 0:
        raise ValueError(f"--ridge must be >= 0, got {args.ridge}")
    for name in ("mlp_hidden", "mlp_rows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    name = args.model or DEFAULT_MODEL
    model, tokenizer = _load(args)
    from kvsqueeze.calibrate.fit import calibrate_kvzap
    from kvsqueeze.methods.kvzap import variant_label, weights_name
    from kvsqueeze.methods.kvzip import KVzip

    fingerprint = model_fingerprint(model)
    plus = args.teacher == "kvzip+"
    mlp = args.student == "mlp"
    destination = Path(args.out) if args.out else user_weights_path(weights_name(plus, mlp), fingerprint)
    state = destination.with_suffix(".state.pt")
    result = calibrate_kvzap(
        model,
        tokenizer,
        state,
        documents=args.documents,
        tokens=args.tokens,
        held_out=args.held_out,
        ridge=args.ridge,
        teacher=KVzip(plus=plus),
        student=args.student,
        mlp_hidden=args.mlp_hidden,
        mlp_rows=args.mlp_rows,
        metadata={"model": name, "fingerprint": fingerprint, "dtype": args.dtype},
    )
    out = result.weights.save(destination)
    label = variant_label(plus, mlp)
    print(
        f"{label} scorer for {name} ({fingerprint}): {result.documents} documents, {result.tokens} training "
        f"tokens, held-out R^2 {result.held_out_r2:.3f}, {result.seconds:.0f} s -> {out}"
    )
    return 0
