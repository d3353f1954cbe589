"""The engine: one thread that admits, prefills and decodes requests with continuous batching.

Each loop iteration, between two decode steps:

1. requests cancelled by their clients leave the batch (their caches are freed);
2. waiting requests are admitted, in arrival order, while their estimated cache fits the KV memory
   (:mod:`~kvsqueeze.server.engine.admission`) and the batch has room;
3. at most one admitted request is prefilled, alone, with its own method and budget (a cacheable prefix is
   compressed once and reused, :mod:`~kvsqueeze.server.engine.prefix`); its first token is sampled and it
   joins the running batch;
4. every running request decodes one token in one forward pass (:class:`BatchedCache`): input (B, 1),
   explicit positions (B, 1), each request attending over its own kept rows. Finished requests leave.

So a new request waits at most one decode step to start, and a long prefill pauses the others' decoding
for its duration (no chunked prefill). The HTTP side talks to the engine only through
:meth:`Engine.submit` and the :class:`RequestHandle` events.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.cache.cache import SqueezeCache
from kvsqueeze.memory import release_freed_memory
from kvsqueeze.server.engine.admission import AdmissionController, Ticket, bytes_per_token, prior_ratio
from kvsqueeze.server.engine.batch import BatchedCache
from kvsqueeze.server.engine.detok import TextStream
from kvsqueeze.server.engine.prefix import PrefixStore, prefix_key
from kvsqueeze.server.engine.request import Event, GenerationRequest, RequestHandle
from kvsqueeze.server.engine.sampling import sample_token
from kvsqueeze.server.errors import APIError
from kvsqueeze.server.metrics import ServerMetrics

log = logging.getLogger("kvsqueeze.server")


class QueueFull(APIError):
    """The waiting queue is at its bound (HTTP 429)."""

    def __init__(self, depth: int) -> None:
        super().__init__(
            429, f"server busy: {depth} requests already wait for KV memory; retry later", code="queue_full"
        )


@dataclass
class EngineConfig:
    """Limits of the engine. ``kv_memory``: bytes the admitted requests' caches may claim in all."""

    kv_memory: int = 4 * 1024**3
    max_queue: int = 64
    max_batch: int = 32
    prefix_cache_entries: int = 8

    def __post_init__(self) -> None:
        for name in ("kv_memory", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


@dataclass
class _Sequence:
    """A request the engine holds: its ticket, and once prefilled its cache and decoding state."""

    handle: RequestHandle
    ticket: Ticket
    stream: TextStream
    generator: torch.Generator | None
    cache: SqueezeCache | None = None
    tokens: list[int] = field(default_factory=list)
    prefix_hit: bool | None = None  # None: no cacheable prefix

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    """Continuous batching over one model; thread-safe :meth:`submit`, one engine thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.metrics = metrics or ServerMetrics()
        self.per_token = bytes_per_token(model.config, model.dtype)
        self.admission = AdmissionController(self.config.kv_memory, self.per_token)
        self.prefixes = PrefixStore(self.config.prefix_cache_entries)
        self.eos = _eos_ids(model, tokenizer)
        self.tokenizer_lock = threading.Lock()  # the HTTP side encodes while this thread decodes
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._admitted: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._stopping = False
        self._abort = False  # stop now: fail what is left
        self._thread: threading.Thread | None = None
        self._steps: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self.step_log: list[tuple[float, int]] | None = None  # set to [] to record (seconds, batch) per step
        self.completed = 0  # requests finished with a response
        self.peak_running = 0  # the most requests admitted at once (running or about to prefill)
        self.metrics.limit_bytes.set(self.config.kv_memory)

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvsqueeze-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, let the queued and running ones finish (up to ``timeout``), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cond:
                    self._abort = True
                    self._cond.notify_all()
                self._thread.join(10.0)
            self._thread = None

    def estimate(self, request: GenerationRequest) -> int:
        """The bytes ``request`` is admitted on (before its prefill)."""
        tokens = len(request.prompt_ids)
        prior = prior_ratio(request.method, request.budget, tokens, self.model.dtype)
        return self.admission.estimate(request.method_key, prior, tokens, request.max_tokens)

    def submit(self, handle: RequestHandle) -> None:
        """Queue a request; raises :class:`QueueFull` (429) or a 400 when it can never fit."""
        request = handle.request
        need = self.estimate(request)
        if need > self.config.kv_memory:
            self.metrics.rejected.labels("too_large").inc()
            raise APIError(
                400,
                f"this request needs about {need} bytes of KV cache, more than the server's {self.config.kv_memory}",
                code="kv_memory_exceeded",
            )
        seq = _Sequence(
            handle,
            Ticket(need),
            TextStream(self.tokenizer, request.stop, self.tokenizer_lock),
            request.sampling.generator(),
        )
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            busy = len(self._admitted) + len(self._running)
            if (
                not self._waiting
                and busy < self.config.max_batch
                and self.admission.try_admit(seq.ticket, busy == 0)
            ):
                self._admitted.append(seq)
                self.metrics.admitted.inc()
                self.peak_running = max(self.peak_running, busy + 1)
            elif len(self._waiting) < self.config.max_queue:
                self._waiting.append(seq)
                self.metrics.queue_depth.set(len(self._waiting))
            else:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(len(self._waiting))
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "waiting": len(self._waiting),
                "admitted": len(self._admitted),
                "running": len(self._running),
                "reserved_bytes": self.admission.reserved,
                "prefix_bytes": self.admission.prefix_bytes,
                "kv_memory": self.config.kv_memory,
            }

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._admitted or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._admitted or self._running):
                    return
                if self._abort:
                    self._fail_all(APIError(503, "the server shut down before this request finished"))
                    return
            self.run_once()

    def run_once(self, decode: bool = True) -> None:
        """One iteration between two decode steps: drop cancelled, admit, prefill one, decode one step.

        The engine thread calls it in a loop; without :meth:`start` a caller (a test, the throughput
        benchmark) drives the engine with it synchronously. ``decode=False`` only admits and prefills.
        """
        with self._cond:
            self._drop_cancelled()
            self._admit()
            seq = self._admitted.popleft() if self._admitted else None
        try:
            if seq is not None:
                self._prefill(seq)
            if decode and self._running:
                self._decode_step()
        except Exception as err:  # keep serving: fail what was in flight, log the trace
            log.exception("engine step failed")
            failed = list(self._running)
            if seq is not None and seq not in failed and not seq.handle.finished.is_set():
                failed.append(seq)
            for s in failed:
                self._fail(s, APIError(500, f"internal error: {type(err).__name__}: {err}"))
        self._update_gauges()
        if not self._running and not self._admitted:
            release_freed_memory()  # what the finished requests left in reference cycles and the heap

    def _admit(self) -> None:
        """Admit waiting requests in order while they fit (called with the lock held)."""
        while self._waiting:
            busy = len(self._admitted) + len(self._running)
            if busy >= self.config.max_batch:
                break
            seq = self._waiting[0]
            if not self.admission.try_admit(seq.ticket, alone=busy == 0):
                break
            self._waiting.popleft()
            self._admitted.append(seq)
            self.metrics.admitted.inc()
        self.peak_running = max(self.peak_running, len(self._admitted) + len(self._running))
        self.metrics.queue_depth.set(len(self._waiting))

    def _drop_cancelled(self) -> None:
        """Remove requests whose clients went away (lock held)."""
        for queue in (self._waiting, self._admitted):
            for seq in [s for s in queue if s.handle.cancelled]:
                queue.remove(seq)
                self.admission.release(seq.ticket)
        keep = []
        for seq in self._running:
            if seq.handle.cancelled:
                self._finish(seq, "cancelled", notify=False)
            else:
                keep.append(seq)
        self._running = keep

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def _prefill(self, seq: _Sequence) -> None:
        request = seq.request
        try:
            if request.prefilled is not None:
                seq.cache, logits = request.prefilled
                request.prefilled = None
            elif request.prefix_tokens:
                seq.cache, logits = self._prefill_with_prefix(seq)
            else:
                seq.cache = SqueezeCache(self.model, request.method, request.budget, tokenizer=self.tokenizer)
                ids = torch.tensor([request.prompt_ids], device=self.model.device)  # (1, L)
                out = self.model(input_ids=ids, cache=seq.cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[0, -1]  # (V,)
        except ValueError as err:  # a budget below the method's floor, ...
            self._fail(seq, APIError(400, str(err), code="invalid_method_config"))
            return
        prompt = len(request.prompt_ids)
        real = seq.cache.nbytes()
        if seq.prefix_hit is None:
            self.admission.learn(request.method_key, real, prompt)
        self.admission.adjust(seq.ticket, real + request.max_tokens * self.per_token)
        self.metrics.prompt_tokens.inc(prompt)
        self._running.append(seq)
        self._accept(seq, sample_token(logits, request.sampling, seq.generator))

    def _prefill_with_prefix(self, seq: _Sequence) -> tuple[SqueezeCache, torch.Tensor]:
        """Continue a copy of the prefix's compressed cache (built once) with this request's suffix."""
        request = seq.request
        n = request.prefix_tokens
        prefix, suffix = request.prompt_ids[:n], request.prompt_ids[n:]
        key = prefix_key(request.method_key, prefix)
        base = self.prefixes.get(key)
        seq.prefix_hit = base is not None
        if base is None:
            self.metrics.prefix_misses.inc()
            base = SqueezeCache(self.model, request.method, request.budget, tokenizer=self.tokenizer)
            ids = torch.tensor([prefix], device=self.model.device)  # (1, P)
            self.model(input_ids=ids, cache=base, use_cache=True, logits_to_keep=1)
            self.prefixes.put(key, base)
            self.admission.set_prefix_bytes(self.prefixes.nbytes())
        else:
            self.metrics.prefix_hits.inc()
        cache = base.copy()
        ids = torch.tensor([suffix], device=self.model.device)  # (1, S)
        positions = torch.arange(n, n + len(suffix), device=self.model.device)[None]  # (1, S)
        out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[0, -1]

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def _decode_step(self) -> None:
        running = list(self._running)  # finished requests leave self._running during the loop below
        start = time.perf_counter()
        ids = torch.tensor([[s.tokens[-1]] for s in running], device=self.model.device)  # (B, 1)
        positions = torch.tensor([[s.cache.get_seq_length()] for s in running], device=ids.device)  # (B, 1)
        batch = BatchedCache([s.cache for s in running])
        out = self.model(input_ids=ids, position_ids=positions, cache=batch, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]  # (B, V)
        for seq, row in zip(running, logits, strict=True):
            self._accept(seq, sample_token(row, seq.request.sampling, seq.generator))
        seconds = time.perf_counter() - start
        self._steps.append((seconds, len(running)))
        if self.step_log is not None:
            self.step_log.append((seconds, len(running)))

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record a sampled token, stream its text, and finish the request when it is done."""
        seq.tokens.append(token)
        self.metrics.generated_tokens.inc()
        if token in self.eos:
            delta, reason = seq.stream.finish(), "stop"
        else:
            delta = seq.stream.push(token)
            reason = "stop" if seq.stream.stopped else None
            if reason is None and len(seq.tokens) >= seq.request.max_tokens:
                reason = "length"
            if reason == "length":
                delta += seq.stream.finish()
        seq.handle.emit(Event("token", text=delta, token=token))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: _Sequence, reason: str, notify: bool = True) -> None:
        if seq in self._running:
            self._running.remove(seq)
        self.admission.release(seq.ticket)
        self.metrics.completed.labels(reason).inc()
        if notify:
            self.completed += 1
            usage = {
                "prompt_tokens": len(seq.request.prompt_ids),
                "completion_tokens": len(seq.tokens),
                "total_tokens": len(seq.request.prompt_ids) + len(seq.tokens),
                "kv_cache_bytes": seq.cache.nbytes(),
                "kv_cache_full_bytes": seq.cache.full_nbytes(),
            }
            if seq.prefix_hit is not None:
                usage["prefix_cached_tokens"] = seq.request.prefix_tokens if seq.prefix_hit else 0
            seq.handle.emit(Event("done", finish_reason=reason, usage=usage))
        _free(seq)

    def _fail(self, seq: _Sequence, error: APIError) -> None:
        if seq in self._running:
            self._running.remove(seq)
        self.admission.release(seq.ticket)
        self.metrics.rejected.labels("error").inc()
        _free(seq)
        seq.handle.emit(Event("error", error=error))

    def _fail_all(self, error: APIError) -> None:
        """Fail every request the engine holds (lock held)."""
        for seq in [*self._waiting, *self._admitted, *self._running]:
            self._fail(seq, error)
        self._waiting.clear()
        self._admitted.clear()

    def _update_gauges(self) -> None:
        m = self.metrics
        caches = [s.cache for s in self._running if s.cache is not None]
        m.cache_bytes.set(sum(c.group.total_nbytes for c in caches))
        m.full_cache_bytes.set(sum(c.full_nbytes() for c in caches))
        m.reserved_bytes.set(self.admission.reserved)
        m.prefix_bytes.set(self.admission.prefix_bytes)
        m.running.set(len(self._running))
        seconds = sum(t for t, _ in self._steps)
        m.tokens_per_second.set(sum(n for _, n in self._steps) / seconds if seconds > 0 else 0.0)

    def decode_rate(self) -> float:
        """Decoded tokens per second over the last steps (0 before any)."""
        seconds = sum(t for t, _ in self._steps)
        return sum(n for _, n in self._steps) / seconds if seconds > 0 else 0.0


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a generation: the generation config's EOS ids, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list | tuple) else [eos]
    return {int(i) for i in ids if i is not None}


def _free(seq: _Sequence) -> None:
    """Free a finished request's rows now: its cache's layers form reference cycles, which only the
    cyclic collector would free, and late (the bytes would stay unaccounted for meanwhile)."""
    if seq.cache is not None:
        seq.cache.reset()
        seq.cache = None
