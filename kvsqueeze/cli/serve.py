"""``kvsqueeze serve``: the OpenAI-compatible server (needs the ``server`` extra)."""

from __future__ import annotations

import argparse
import sys

TINY_PREFIX = "tiny:"  # `--model tiny:llama`: a tiny random model, for smoke tests of the server itself


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` subcommand."""
    from kvsqueeze.cli.main import _add_method, _add_model

    p = sub.add_parser(
        "serve",
        help="serve a model behind the OpenAI API, with per-request compression and continuous batching",
    )
    _add_model(p)
    _add_method(p, "snapkv", "0.25")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--kv-memory", default="4GiB", help="KV cache memory the admitted requests may claim")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for memory; then 429")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoding together at most")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request sets none")
    p.add_argument("--max-request-bytes", default="4MiB", help="largest request body")
    p.add_argument(
        "--context-method",
        default="kvzap",
        help="compresses cacheable prefixes (kvzap or kvzip; default kvzap)",
    )
    p.add_argument("--prefix-cache", type=int, default=8, help="compressed prefixes kept for reuse")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests")
    p.add_argument("--served-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 is faster on busy cores)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--engine",
        choices=("kvsqueeze", "vllm"),
        default="kvsqueeze",
        help="kvsqueeze's own server, or vLLM's OpenAI server with kvsqueeze's reuse connector "
        "(its own venv, built on first use; vLLM flags after `--`, e.g. `-- --tensor-parallel-size 2`)",
    )
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return run_vllm(args)
    if args.vllm_args:
        raise ValueError(
            f"unexpected arguments {' '.join(args.vllm_args)} (vLLM flags go with --engine vllm)"
        )
    try:
        import uvicorn

        from kvsqueeze.server import EngineConfig, HTTPLimits, build_app
        from kvsqueeze.server.engine.admission import parse_bytes
    except ImportError as err:
        raise ImportError(
            f"kvsqueeze serve needs the server extra: pip install 'kvsqueeze[server]' ({err})"
        ) from None
    from kvsqueeze.cli.commands import _method
    from kvsqueeze.cli.params import coerce_params
    from kvsqueeze.methods import with_profile

    method = _method(args)  # validate before the model loads
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.profile:
        method = with_profile(method, args.profile)
    engine = EngineConfig(
        kv_memory=parse_bytes(args.kv_memory),
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        prefix_cache_entries=args.prefix_cache,
    )
    limits = HTTPLimits(
        api_key=args.api_key,
        max_request_bytes=parse_bytes(args.max_request_bytes),
        shutdown_timeout=args.shutdown_timeout,
    )
    model, tokenizer, name = _load(args)
    app = build_app(
        model,
        tokenizer,
        model_name=args.served_name or name,
        engine=engine,
        limits=limits,
        method=args.method,
        budget=args.budget,
        params=coerce_params(args.method, dict(args.param)),
        context_method=args.context_method,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_tokens_limit=args.max_tokens,
    )
    print(
        f"kvsqueeze: serving {args.served_name or name} on http://{args.host}:{args.port}/v1 "
        f"({method.name} @ {args.budget}, kv memory {args.kv_memory})",
        file=sys.stderr,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.shutdown_timeout),
    )
    return 0


def _load(args: argparse.Namespace):
    """The model, its tokenizer and the id it is served as."""
    from kvsqueeze.cli.commands import _load as load
    from kvsqueeze.models import DEFAULT_MODEL

    name = args.model or DEFAULT_MODEL
    if name.startswith(TINY_PREFIX):
        from kvsqueeze.models.tiny import tiny_model, tiny_tokenizer

        arch = name[len(TINY_PREFIX) :]
        return tiny_model(arch, num_hidden_layers=2, head_dim=32), tiny_tokenizer(chat=True), name
    model, tokenizer = load(args)
    return model, tokenizer, name


def run_vllm(args: argparse.Namespace) -> int:
    """vLLM's OpenAI server on the model's HF folder with :class:`kvsqueeze.vllm.connector.KVSqueezeConnector`."""
    import os

    from kvsqueeze.models import DEFAULT_MODEL, hf_folder
    from kvsqueeze.vllm import vllm_serve_command
    from kvsqueeze.vllm.env import ensure_vllm_env

    name = args.model or DEFAULT_MODEL
    folder = hf_folder(name)
    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    python = ensure_vllm_env()
    cmd = vllm_serve_command(python, folder, args.host, args.port, args.served_name or name, extra)
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    print(f"kvsqueeze: {' '.join(cmd)}", file=sys.stderr)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def run_vllm_env(args: argparse.Namespace) -> int:
    """Print the vLLM venv's python, building the venv first if needed (minutes, once)."""
    from kvsqueeze.vllm.env import ensure_vllm_env

    print(ensure_vllm_env())
    return 0
