"""Admission by cache bytes: a request runs when its compressed cache fits the server's KV memory.

Before its prefill a request is admitted on an *estimate*: ``(kept prompt tokens + max_tokens) x bytes per
token``, where the kept share is the method's measured ratio (real bytes over full bytes of earlier
prefills with the same method and budget) or, before any, the budget's ratio (times the bit width's share
for quantizing methods). After its prefill the reservation becomes the *real* bytes the cache holds plus
``max_tokens`` full-precision rows for what it may still decode. Requests that do not fit wait in a bounded
FIFO queue; past its bound they are refused (HTTP 429). Compressed context prefixes kept for reuse count
against the same memory.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from kvsqueeze.cache.budget import Budget
from kvsqueeze.methods import Method
from kvsqueeze.text_config import head_dim_of, layer_types_of

UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4})


def parse_bytes(text: str | int) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"1.5GB"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    if unit not in UNITS or not number:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 1000000")
    value = float(number) * UNITS[unit]
    if value <= 0 or math.isnan(value):
        raise ValueError(f"a size must be > 0, got {text!r}")
    return int(value)


def bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes a full cache stores per token over all layers: keys, values and positions of every KV head."""
    text = config.get_text_config(decoder=True)
    heads = text.num_key_value_heads
    row = 2 * head_dim_of(text) * torch.empty((), dtype=dtype).element_size() + 4  # k, v, int32 position
    return text.num_hidden_layers * heads * row


def prior_ratio(method: Method, budget: Budget, prompt_tokens: int, dtype: torch.dtype) -> float:
    """A first guess at the share of full bytes ``method`` keeps of a ``prompt_tokens`` prompt."""
    comp = method.components()
    kept = 1.0
    if method.uses_budget:
        kept = min(1.0, float(budget.resolve(torch.tensor([prompt_tokens]))[0]) / max(1, prompt_tokens))
    if comp.quantize is not None:
        full_bits = torch.empty((), dtype=dtype).element_size() * 8
        scheme = comp.quantize.scheme
        pairs = comp.quantize.layer_bits or ((scheme.high_key_bits, scheme.high_value_bits),)  # a bit profile
        bits = sum(k + v for k, v in pairs) / (2 * len(pairs))
        kept *= min(1.0, 2.0 * bits / full_bits)  # codes plus parameters, generously
    return kept


@dataclass
class Ticket:
    """One request's claim on KV memory."""

    reserved: int
    admitted: bool = False


class AdmissionController:
    """Bytes reserved by running requests and kept prefixes against ``limit``; thread-safe."""

    def __init__(self, limit: int, per_token: int) -> None:
        self.limit = limit
        self.per_token = per_token
        self.reserved = 0  # bytes claimed by admitted requests
        self.prefix_bytes = 0  # bytes of compressed prefixes kept for reuse
        self._ratios: dict[str, float] = {}  # measured kept share per (method, budget)
        self._lock = threading.Lock()

    def estimate(self, key: str, prior: float, prompt_tokens: int, max_tokens: int) -> int:
        """Bytes a request will need: its kept prompt rows plus ``max_tokens`` decoded rows."""
        ratio = self._ratios.get(key, prior)
        return int(math.ceil((prompt_tokens * ratio + max_tokens) * self.per_token))

    def learn(self, key: str, real: int, prompt_tokens: int) -> None:
        """Record a prefill's real bytes, so later estimates of the same method and budget are right."""
        share = real / max(1, prompt_tokens * self.per_token)
        with self._lock:
            old = self._ratios.get(key)
            self._ratios[key] = share if old is None else 0.5 * (old + share)

    def used(self) -> int:
        return self.reserved + self.prefix_bytes

    def try_admit(self, ticket: Ticket, alone: bool) -> bool:
        """Claim ``ticket.reserved`` bytes if they fit (always when nothing else runs)."""
        with self._lock:
            if alone or self.used() + ticket.reserved <= self.limit:
                self.reserved += ticket.reserved
                ticket.admitted = True
                return True
            return False

    def adjust(self, ticket: Ticket, reserved: int) -> None:
        """Replace an admitted ticket's estimate by what it really holds and may still grow to."""
        with self._lock:
            self.reserved += reserved - ticket.reserved
            ticket.reserved = reserved

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.admitted:
                self.reserved -= ticket.reserved
                ticket.admitted = False

    def set_prefix_bytes(self, value: int) -> None:
        with self._lock:
            self.prefix_bytes = value


def sliding_share(config: PretrainedConfig, prompt_tokens: int) -> float:
    """Share of a full cache's rows a model keeps when some layers slide over a window (1.0 otherwise)."""
    text = config.get_text_config(decoder=True)
    types = layer_types_of(text)
    window = getattr(text, "sliding_window", None) or prompt_tokens
    rows = [min(prompt_tokens, window) if t == "sliding_attention" else prompt_tokens for t in types]
    return sum(rows) / (len(types) * max(1, prompt_tokens))
