"""The user's budget: a ratio of the prompt or an absolute number of tokens per head and layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How many cached tokens each KV head of each layer may keep, on average over layers.

    A ``float`` in ``(0, 1]`` is a ratio of the sequence's prompt length (``ceil(ratio * L)`` tokens); an
    ``int >= 1`` is an absolute token count. Allocators may give some layers or heads more and others less.
    """

    ratio: float | None = None
    tokens: int | None = None

    @classmethod
    def parse(cls, value: float | int | str | Budget) -> Budget:
        """Read a budget from user input: ``0.25``, ``"0.25"``, ``512`` or ``"512"``."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text) if text.isdigit() else float(text)
            except ValueError:
                raise ValueError(f"budget {text!r} is neither a ratio in (0, 1] nor a token count") from None
        if isinstance(value, bool):
            raise ValueError("budget must be a ratio in (0, 1] or a token count, not a bool")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"a token budget must be >= 1, got {value}")
            return cls(tokens=value)
        if isinstance(value, float):
            if not (0.0 < value <= 1.0) or math.isnan(value):
                raise ValueError(
                    f"budget ratio must be in (0, 1], got {value}; pass an int for a token count"
                )
            return cls(ratio=value)
        raise ValueError(f"budget must be a ratio in (0, 1] or a token count, got {type(value).__name__}")

    @property
    def is_full(self) -> bool:
        return self.ratio == 1.0

    def resolve(self, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """Tokens per head for each sequence, (B,) long, from the real (unpadded) prompt lengths (B,)."""
        if self.tokens is not None:
            return torch.full_like(prompt_lengths, self.tokens)
        return torch.ceil(prompt_lengths.double() * self.ratio).long().clamp(min=1)

    def __str__(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"ratio {self.ratio:g}"
