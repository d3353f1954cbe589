"""A method is a named composition: scorer x allocator x action x schedule.

Each method file defines a dataclass whose fields are the paper's hyperparameters (with the paper's or
official code's defaults) and whose :meth:`Method.components` builds the four parts. The cache runs every
method through the same code, so a new method is one short file and needs no special case anywhere.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import torch

from kvsqueeze.actions.base import Action
from kvsqueeze.actions.evict import Evict
from kvsqueeze.actions.quantize import Quantize
from kvsqueeze.actions.select import Select
from kvsqueeze.allocators.base import Allocator
from kvsqueeze.allocators.heads import HeadAllocator, UniformHeads
from kvsqueeze.scorers.base import Scorer


class Schedule(StrEnum):
    """When a method compresses."""

    NEVER = "never"  # the full cache
    PREFILL = "prefill"  # once, at the end of the first forward pass (the prompt)
    EVERY_STEP = "every_step"  # after the prompt, and again at every decode step


@dataclass(frozen=True)
class Components:
    """The four choices of a method, plus the rows it always protects.

    ``allocator`` sizes each layer; ``heads`` splits a layer's size over its KV heads (uniform by default,
    or adaptive: Ada-KV, mass); ``quantize`` stores what eviction keeps at low bit width; ``select`` keeps
    every row it is given and lets each decode step attend to a query-dependent few (Quest, MPCache).
    """

    scorer: Scorer | None
    allocator: Allocator | None
    action: Action = field(default_factory=Evict)
    heads: HeadAllocator = field(default_factory=UniformHeads)
    schedule: Schedule = Schedule.PREFILL
    window: int = 0  # the last `window` rows are always kept
    sinks: int = 0  # rows at positions < sinks are always kept
    recent_share: float | None = None  # if set, the protected window is this share of each layer's budget
    quantize: Quantize | None = None  # if set, the kept rows are stored quantized (ZipCache, KIVI)
    select: Select | None = None  # if set, decode steps attend to the rows of selected pages only

    def protected_recent(self, layer_budget: int) -> int:
        """Rows protected at the end of a segment for a layer that keeps ``layer_budget`` rows."""
        if self.recent_share is not None:
            return int(layer_budget * self.recent_share)
        return self.window

    def min_budget(self) -> int:
        """The smallest per-layer budget this method can honour."""
        return self.sinks + (0 if self.recent_share is not None else self.window) + 1

    @property
    def decodes_stepwise(self) -> bool:
        """Whether the cache changes while decoding (per-step eviction, a quantization residual) or a
        decode step reads a query-dependent few rows (selection): then a continuation must be fed token by
        token, not as one chunk, to see what generation sees."""
        return self.schedule is Schedule.EVERY_STEP or self.quantize is not None or self.select is not None


@dataclass
class Method(ABC):
    """Base class of every named method. Subclasses are dataclasses and register with :func:`register`."""

    name: ClassVar[str] = "method"
    summary: ClassVar[str] = ""
    uses_budget: ClassVar[bool] = True  # False: the token budget changes nothing (full, pure quantization)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message when a hyperparameter is out of range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{self.name}: {f.name} must be >= 0, got {value}")

    @abstractmethod
    def components(self) -> Components:
        """Build the scorer, allocator, action and schedule of this method."""

    def params(self) -> dict[str, object]:
        """Hyperparameters and their current values (not internal state such as loaded weights)."""
        return {f.name: getattr(self, f.name) for f in hyperparameters(type(self))}

    def for_model(self, model: torch.nn.Module | None) -> Method:
        """This method made ready for ``model`` (None: only its config is known); by default itself.

        A method whose parts depend on the model's weights (a learned scorer finds its fitted weights
        by the model's fingerprint) returns a ready copy, or raises a one-line ``ValueError``.
        """
        return self


def hyperparameters(cls: type[Method]) -> list[dataclasses.Field]:
    """The dataclass fields of a method that are hyperparameters (internal state is marked so)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(method: str | Method, **params: object) -> Method:
    """Build a method by name with hyperparameter overrides, or pass a built one through."""
    if isinstance(method, Method):
        if params:
            return dataclasses.replace(method, **params)
        return method
    key = str(method).strip().lower().replace("-", "_")
    if "+" in key:
        return _compose(key, params)
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[key]
    known = {f.name for f in hyperparameters(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"{key} has no parameter {', '.join(unknown)}; its parameters: {', '.join(sorted(known)) or 'none'}"
        )
    return cls(**params)


@dataclass
class Composed(Method):
    """An eviction method whose kept rows are stored by a quantization method (``"h2o+kivi"``), or whose
    kept rows a selection method attends to a few at a time (``"snapkv+quest"``, ``"kivi+quest"``).

    Eviction chooses which rows stay (and when), quantization how many bits each one keeps, selection which
    of them each decode step reads; the bytes are the kept rows' (codes and parameters when quantized, plus
    the page bounds when selecting). Hyperparameters go to whichever of the two methods has them.
    """

    eviction: Method = field(default_factory=lambda: get_method("full"))
    quantization: Method = field(default_factory=lambda: get_method("zipcache"))

    @property
    def selects(self) -> bool:
        """True when the second method is a selection method (its part is ``select``, not ``quantize``)."""
        return self.quantization.components().select is not None

    def validate(self) -> None:
        evict, quant = self.eviction.components(), self.quantization.components()
        if quant.select is not None:
            self._validate_selection(evict, quant)
            return
        if quant.quantize is None or quant.schedule is not Schedule.NEVER:
            raise ValueError(
                f"{self.quantization.name} is not a quantization method; write EVICTION+QUANTIZATION"
            )
        if evict.quantize is not None:
            raise ValueError(f"{self.eviction.name} already quantizes; write EVICTION+QUANTIZATION")
        if not isinstance(evict.action, Evict):
            raise ValueError(
                f"{self.eviction.name} rewrites kept rows ({evict.action.name}), which needs them in full precision; "
                "it does not compose with quantization"
            )
        self.name = f"{self.eviction.name}+{self.quantization.name}"  # type: ignore[misc]
        self.uses_budget = self.eviction.uses_budget  # type: ignore[misc]

    def _validate_selection(self, first: Components, second: Components) -> None:
        name = f"{self.eviction.name}+{self.quantization.name}"
        if second.scorer is not None or second.schedule is not Schedule.NEVER:
            raise ValueError(
                f"{name}: {self.quantization.name} evicts by itself; only a pure selection method (quest) "
                "goes after the +"
            )
        if first.select is not None:
            raise ValueError(f"{name}: {self.eviction.name} already selects; write EVICTION+quest")
        select = second.select
        if self.eviction.uses_budget and select.ratio is None and select.tokens is None:
            raise ValueError(
                f"{name}: the budget is what {self.eviction.name} keeps; give {self.quantization.name} its own "
                "select_ratio or select_tokens (tokens attended per step)"
            )
        self.name = name  # type: ignore[misc]
        self.uses_budget = self.eviction.uses_budget or self.quantization.uses_budget  # type: ignore[misc]

    def components(self) -> Components:
        second = self.quantization.components()
        if second.select is not None:
            return dataclasses.replace(self.eviction.components(), select=second.select)
        return dataclasses.replace(self.eviction.components(), quantize=second.quantize)

    def params(self) -> dict[str, object]:
        return {**self.eviction.params(), **self.quantization.params()}

    def for_model(self, model: torch.nn.Module | None) -> Method:
        return dataclasses.replace(self, eviction=self.eviction.for_model(model))


def _compose(key: str, params: dict[str, object]) -> Composed:
    """``"EVICTION+QUANTIZATION"`` with each hyperparameter routed to the method that has it."""
    names = key.split("+")
    if len(names) != 2 or not all(names):
        raise ValueError(
            f"a composed method is EVICTION+QUANTIZATION or EVICTION+SELECTION (e.g. snapkv+zipcache, "
            f"snapkv+quest), got {key!r}"
        )
    fields_of = {
        name: {f.name for f in hyperparameters(METHODS[name])} if name in METHODS else set() for name in names
    }
    both = sorted(set(params) & fields_of[names[0]] & fields_of[names[1]])
    if both:
        raise ValueError(
            f"parameter {both[0]} belongs to both {names[0]} and {names[1]}; set it on a built method"
        )
    routed = [{k: v for k, v in params.items() if k in fields_of[name]} for name in names]
    unknown = sorted(set(params) - fields_of[names[0]] - fields_of[names[1]])
    if unknown:
        raise ValueError(f"{key} has no parameter {', '.join(unknown)}")
    return Composed(get_method(names[0], **routed[0]), get_method(names[1], **routed[1]))
