"""What the engine is asked to generate, and the handle the HTTP side reads its events from."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from kvsqueeze.cache.budget import Budget
from kvsqueeze.cache.cache import SqueezeCache
from kvsqueeze.methods import Method
from kvsqueeze.server.engine.sampling import SamplingParams

_ids = itertools.count(1)


@dataclass
class GenerationRequest:
    """One request, tokenized and validated.

    ``prefix_tokens`` > 0 marks the first that many prompt tokens as a cacheable context: they are
    compressed once by ``method`` (query-agnostic) and reused by later requests with the same prefix.
    ``prefilled`` (a cache filled with the prompt and the last prompt position's logits (V,)) skips the
    prefill; the throughput benchmark forks many requests from one prefill this way.
    """

    prompt_ids: list[int]
    method: Method
    budget: Budget
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    prefix_tokens: int = 0
    prefilled: tuple[SqueezeCache, torch.Tensor] | None = None

    @property
    def method_key(self) -> str:
        """Identifies the method, its parameters and the budget (for kept-ratio estimates and prefixes)."""
        params = ",".join(f"{k}={v!r}" for k, v in sorted(self.method.params().items()))
        return f"{self.method.name}({params})@{self.budget}"


@dataclass
class Event:
    """What the engine reports: ``kind`` is ``token`` (``text``, ``token``), ``done`` (``finish_reason``,
    ``usage``) or ``error`` (``error``)."""

    kind: str
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: Exception | None = None


class RequestHandle:
    """The link between one HTTP request (an asyncio task) and the engine thread."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = next(_ids)
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self.events: list[Event] = []  # without a loop (in-process use): collected here
        self.finished = threading.Event()
        self.cancelled = False

    def emit(self, event: Event) -> None:
        """Called by the engine thread."""
        if self.loop is not None and self.queue is not None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
                self.cancelled = True
        else:
            self.events.append(event)
        if event.kind in ("done", "error"):
            self.finished.set()

    async def next_event(self) -> Event:
        return await self.queue.get()

    def cancel(self) -> None:
        """The client went away: the engine drops the request between steps and frees its cache."""
        self.cancelled = True
