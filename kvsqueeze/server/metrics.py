"""Prometheus metrics of one server (its own registry, so several servers in one process never collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


class ServerMetrics:
    """Cache bytes, queue depth, tokens per second, admitted and rejected requests."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cache_bytes = Gauge(
            "kvsqueeze_kv_cache_bytes", "bytes the running requests' caches hold now", registry=r
        )
        self.full_cache_bytes = Gauge(
            "kvsqueeze_kv_cache_full_bytes", "bytes full caches would hold for the same tokens", registry=r
        )
        self.reserved_bytes = Gauge(
            "kvsqueeze_kv_reserved_bytes",
            "KV memory claimed by admitted requests (estimates, then real)",
            registry=r,
        )
        self.prefix_bytes = Gauge(
            "kvsqueeze_prefix_cache_bytes", "bytes of compressed context prefixes kept for reuse", registry=r
        )
        self.limit_bytes = Gauge(
            "kvsqueeze_kv_memory_bytes", "the KV memory budget (--kv-memory)", registry=r
        )
        self.queue_depth = Gauge("kvsqueeze_queue_depth", "requests waiting for KV memory", registry=r)
        self.running = Gauge("kvsqueeze_running_requests", "requests in the decode batch", registry=r)
        self.tokens_per_second = Gauge(
            "kvsqueeze_decode_tokens_per_second", "decoded tokens per second over the last steps", registry=r
        )
        self.admitted = Counter("kvsqueeze_requests_admitted", "requests admitted to run", registry=r)
        self.rejected = Counter("kvsqueeze_requests_rejected", "requests refused", ["reason"], registry=r)
        self.completed = Counter(
            "kvsqueeze_requests_completed", "requests finished", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("kvsqueeze_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("kvsqueeze_generated_tokens", "tokens generated", registry=r)
        self.prefix_hits = Counter(
            "kvsqueeze_prefix_cache_hits", "requests that reused a cached prefix", registry=r
        )
        self.prefix_misses = Counter(
            "kvsqueeze_prefix_cache_misses", "cacheable prefixes compressed anew", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
