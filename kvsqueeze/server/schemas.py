"""Request bodies of the OpenAI API as far as kvsqueeze serves them, plus the ``kvsqueeze`` extra field.

A request picks its own compression in one extra body field (with the official client: ``extra_body=``)::

    "kvsqueeze": {"method": "snapkv", "budget": 0.25, "params": {"window": 16},
                  "cache_prefix": true, "return_token_ids": false}

Everything in it is optional; the server's ``--method``/``--budget``/``-p`` are the defaults. Unknown
OpenAI fields are accepted and ignored, except the ones that would change the answer's shape and are not
supported (``n`` > 1, ``logprobs``, ``echo``, ``best_of`` > 1, ``tools``): those get a 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class KvSqueezeOptions(BaseModel):
    """The ``kvsqueeze`` extra field of a request."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = None  # a method name (see `kvsqueeze methods`), or EVICTION+QUANTIZATION
    budget: float | int | str | None = None  # ratio in (0, 1] (a JSON float) or tokens (a JSON int)
    params: dict[str, Any] = Field(default_factory=dict)  # method hyperparameters
    # chat: True caches the leading system messages; completions: the text the prompt starts with
    cache_prefix: bool | str = False
    return_token_ids: bool = False  # add the generated token ids to the response (for tests and tools)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class CommonRequest(BaseModel):
    """The sampling and limit fields chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    kvsqueeze: KvSqueezeOptions = Field(default_factory=KvSqueezeOptions)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (the text parts of a multi-part content)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"message content of type {part.get('type')!r} is not supported; send text")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None


def first_error(err: ValidationError) -> str:
    """A pydantic validation error as one line: ``field.path: message``."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    return f"{where}: {first.get('msg', 'invalid value')}"
