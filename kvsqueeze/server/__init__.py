"""``kvsqueeze serve``: an OpenAI-compatible server where compression buys concurrency.

    from kvsqueeze.server import build_app
    app = build_app(model, tokenizer, model_name="smollm2-135m", method="snapkv", budget=0.25)
    # uvicorn.run(app, host="127.0.0.1", port=8000)

Layout: :mod:`~kvsqueeze.server.app` (HTTP), :mod:`~kvsqueeze.server.prepare` (request checks and
tokens), :mod:`~kvsqueeze.server.schemas` (bodies), :mod:`~kvsqueeze.server.engine` (admission, batching,
prefix reuse), :mod:`~kvsqueeze.server.metrics`. Needs the ``server`` extra (fastapi, uvicorn,
prometheus-client).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.attention import enable
from kvsqueeze.server.app import HTTPLimits, create_app
from kvsqueeze.server.engine.scheduler import Engine, EngineConfig
from kvsqueeze.server.prepare import RequestBuilder, ServeDefaults

__all__ = [
    "Engine",
    "EngineConfig",
    "HTTPLimits",
    "RequestBuilder",
    "ServeDefaults",
    "build_app",
    "create_app",
]


def build_app(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    engine: EngineConfig | None = None,
    limits: HTTPLimits | None = None,
    **defaults: Any,
) -> Any:
    """The FastAPI app serving ``model`` as ``model_name``; ``defaults`` are :class:`ServeDefaults` fields."""
    enable(model)
    serve_defaults = ServeDefaults(model_name=model_name, **defaults)
    core = Engine(model, tokenizer, engine)
    builder = RequestBuilder(model, tokenizer, serve_defaults, core.tokenizer_lock)
    return create_app(core, builder, limits)
