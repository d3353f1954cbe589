"""Offline per-layer budgets: a profile of kept ratios per layer, measured once, reused by any method.

PrefixKV's repository estimates each layer's ratio on calibration prompts and reuses the average online,
without a search (reference/eviction-methods.md §4c). ``kvsqueeze profile`` does the same with any method
that sizes layers adaptively (PrefixKV by default) and writes a JSON file; :func:`with_profile` (and
``--profile FILE`` on the command line) gives a method those layer budgets instead of its own allocator.

A profile is a shape: its ratios are rescaled so their mean is the budget you ask for (capped at 1).

A profile may also give each layer its own bit widths, ``key_bits`` and ``value_bits`` (``kvsqueeze tune
--bytes``, :mod:`kvsqueeze.tune.bits`): with a quantizing method (``kivi``, ``zipcache``, ``h2o+kivi``)
layer ``i`` then stores its keys at ``key_bits[i]`` and its values at ``value_bits[i]`` bits
(:attr:`~kvsqueeze.actions.quantize.Quantize.layer_bits`; for zipcache, its salient set's bits). Such a
profile may carry no keep ratios, and then leaves the layer budgets to the method. Profile files written
before bits existed load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest
from kvsqueeze.methods.base import Components, Method
from kvsqueeze.quantization.packing import SUPPORTED_BITS


@dataclass
class LayerProfile:
    """Kept ratio and/or bit widths per layer, measured on calibration prompts or searched, and how.

    ``keep_ratios`` (may be empty when bits are given) shape the layer budgets; ``key_bits`` and
    ``value_bits`` (both or neither, 2, 4 or 8 each) are the bits a quantizing method stores each layer's
    keys and values at.
    """

    keep_ratios: list[float] = field(default_factory=list)
    model: str = ""
    method: str = ""
    budget: float = 0.0
    num_prompts: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    search: dict = field(default_factory=dict)  # how ``kvsqueeze tune`` found it (empty: measured)
    key_bits: list[int] = field(default_factory=list)  # per layer, for a quantizing method (empty: its own)
    value_bits: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        ratios, bits = self.keep_ratios, (self.key_bits, self.value_bits)
        if not all(isinstance(x, list) for x in (ratios, *bits)):
            raise ValueError("keep_ratios, key_bits and value_bits of a layer profile must be lists")
        if not ratios and not self.key_bits:
            raise ValueError("a layer profile needs a non-empty list of keep_ratios or of key_bits")
        if not all(isinstance(r, int | float) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios):
            raise ValueError("every keep ratio of a layer profile must be a number in (0, 1]")
        if len(self.key_bits) != len(self.value_bits):
            raise ValueError("a layer profile gives key_bits and value_bits for the same layers, or neither")
        if not all(type(b) is int and b in SUPPORTED_BITS for b in (*self.key_bits, *self.value_bits)):
            raise ValueError("every bit width of a layer profile must be 2, 4 or 8")
        if ratios and self.key_bits and len(ratios) != len(self.key_bits):
            raise ValueError(f"{len(ratios)} keep ratios but {len(self.key_bits)} layers of bits")

    @property
    def layer_bits(self) -> tuple[tuple[int, int], ...] | None:
        """Per layer ``(key bits, value bits)``, or None when the profile gives no bits."""
        return tuple(zip(self.key_bits, self.value_bits, strict=True)) or None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LayerProfile:
        """Read a profile JSON; a one-line ``ValueError`` if it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"no profile file {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc.msg} (line {exc.lineno})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not ({"keep_ratios", "key_bits"} & set(data)):
            raise ValueError(f"{path} is not a layer profile (no keep_ratios or key_bits)")
        return cls(**{k: v for k, v in data.items() if k in known})

    def scaled(self, average: float) -> list[float]:
        """The ratios rescaled to mean ``average``, each capped at 1."""
        mean = sum(self.keep_ratios) / len(self.keep_ratios)
        return [min(1.0, r * average / mean) for r in self.keep_ratios]


class ProfileAllocator(Allocator):
    """Each layer keeps its profiled share of the prompt; decoding follows the method's own allocator."""

    name: ClassVar[str] = "profile"

    def __init__(self, profile: LayerProfile, inner: Allocator | None) -> None:
        self.profile, self.inner = profile, inner

    def layer_budget(self, request: LayerRequest) -> torch.Tensor:
        if len(self.profile.keep_ratios) != request.num_layers:
            raise ValueError(
                f"the profile has {len(self.profile.keep_ratios)} layers, the model {request.num_layers}"
            )
        out = []
        for capacity, length in zip(request.budget.tolist(), request.prompt_lengths.tolist(), strict=True):
            if length <= capacity:
                out.append(int(capacity))
                continue
            ratio = self.profile.scaled(capacity / length)[request.layer_idx]
            out.append(max(request.window + 1, int(length) - round((1 - ratio) * length)))
        return torch.tensor(out, dtype=torch.long, device=request.budget.device)

    def decode_budget(
        self,
        prefill_budget: torch.Tensor,
        prompt_lengths: torch.Tensor,
        tokens_seen: torch.Tensor,
        stored: torch.Tensor,
    ) -> torch.Tensor:
        if self.inner is None:
            return prefill_budget
        return self.inner.decode_budget(prefill_budget, prompt_lengths, tokens_seen, stored)


@dataclass
class Profiled(Method):
    """``base`` with its layer budgets taken from ``profile`` (see :func:`with_profile`)."""

    summary: ClassVar[str] = "any method with offline per-layer budgets from a profile"
    base: Method = None  # type: ignore[assignment]
    profile: LayerProfile = None  # type: ignore[assignment]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.base.name}+profile"

    def validate(self) -> None:
        if not isinstance(self.base, Method) or not isinstance(self.profile, LayerProfile):
            raise ValueError("Profiled needs a built method and a LayerProfile")
        if self.profile.key_bits and self.base.components().quantize is None:
            raise ValueError(
                f"the profile gives bits per layer, but {self.base.name} does not quantize; use it with a "
                "quantizing method (kivi, zipcache, h2o+kivi, ...)"
            )
        self.uses_budget = self.base.uses_budget  # type: ignore[misc]  # kivi with bits keeps every row

    def components(self) -> Components:
        base = self.base.components()
        parts = {}
        if self.profile.keep_ratios:
            parts["allocator"] = ProfileAllocator(self.profile, base.allocator)
        if self.profile.key_bits:
            parts["quantize"] = dataclasses.replace(base.quantize, layer_bits=self.profile.layer_bits)
        return dataclasses.replace(base, **parts)

    def for_model(self, model: torch.nn.Module | None) -> Method:
        return dataclasses.replace(self, base=self.base.for_model(model))


def with_profile(method: Method, profile: LayerProfile | str | Path) -> Profiled:
    """``method`` with the per-layer budgets of ``profile`` (a :class:`LayerProfile` or its JSON path)."""
    if not isinstance(profile, LayerProfile):
        profile = LayerProfile.load(profile)
    return Profiled(base=method, profile=profile)


@torch.inference_mode()
def compute_profile(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    method: Method,
    budget: float,
    *,
    model_name: str = "",
    progress: bool = True,
) -> LayerProfile:
    """Average kept ratio per layer of ``method`` at ``budget`` over ``prompts`` (token ids (1, L) each)."""
    from tqdm.auto import tqdm

    from kvsqueeze.cache import SqueezeCache

    if not prompts:
        raise ValueError("profiling needs at least one calibration prompt")
    totals: list[float] | None = None
    for ids in tqdm(prompts, desc="profile", unit="prompt", disable=not progress):
        cache = SqueezeCache(model, method, budget)
        model(ids, cache=cache, logits_to_keep=1)
        kept = cache.stored_rows()[:, 0].float().mean(-1) / ids.shape[1]  # (N,) sequence 0, mean over heads
        totals = (
            kept.tolist() if totals is None else [t + k for t, k in zip(totals, kept.tolist(), strict=True)]
        )
    ratios = [min(1.0, max(t / len(prompts), 1e-6)) for t in totals]
    return LayerProfile(
        keep_ratios=[round(r, 6) for r in ratios],
        model=model_name,
        method=method.name,
        budget=budget,
        num_prompts=len(prompts),
        prompt_tokens=[int(p.shape[1]) for p in prompts],
    )
