"""A learned single-pass scorer: KVzip's scores predicted from the attention input (KVzap, Jegou et al., 2026).

KVzip (:mod:`kvsqueeze.scorers.reconstruction`) keeps the facts a later question needs, but it replays the
context, which doubles the prefill. KVzap (arXiv 2601.07891) fits, per layer, a small map from the hidden
state a token enters attention with to the log of its KVzip score, one output per KV head; at inference it
runs inside the one prefill, at the cost of a (D_model x H_kv) matmul per layer. The map is linear, or a
two-layer MLP (GELU) when the weights file carries one.

``ScorerWeights`` is the file format (safetensors): per-layer tensors plus metadata saying which model it was
fitted for (its fingerprint), how, and on what. Plain tensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer

FORMAT = "kvsqueeze-learned-scorer/1"
LINEAR_TENSORS = ("weight", "bias")  # (N, H_kv, D), (N, H_kv)
MLP_TENSORS = ("w1", "b1", "w2", "b2")  # (N, Hd, D), (N, Hd), (N, H_kv, Hd), (N, H_kv)


@dataclass
class ScorerWeights:
    """Per-layer weights of a learned scorer and what they were fitted for.

    ``tensors`` holds either the linear map (``weight`` (N, H_kv, D), ``bias`` (N, H_kv)) or the MLP
    (``w1``, ``b1``, ``w2``, ``b2``). ``metadata`` says which model (``fingerprint``) and how it was made.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = set(self.tensors)
        if names not in (set(LINEAR_TENSORS), set(MLP_TENSORS)):
            raise ValueError(
                f"scorer weights hold {sorted(names)}; expected {list(LINEAR_TENSORS)} or {list(MLP_TENSORS)}"
            )
        self.tensors = {k: v.float().contiguous() for k, v in self.tensors.items()}

    @property
    def kind(self) -> str:
        return "linear" if "weight" in self.tensors else "mlp"

    @property
    def num_layers(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.tensors["weight" if self.kind == "linear" else "w2"].shape[1]

    @property
    def input_dim(self) -> int:
        return self.tensors["weight" if self.kind == "linear" else "w1"].shape[2]

    @property
    def fingerprint(self) -> str:
        return self.metadata.get("fingerprint", "")

    def predict(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted log scores (..., H_kv) fp32 of hidden states (..., D) in ``layer``."""
        x = hidden.float()
        t = self.tensors
        if self.kind == "linear":
            return x @ t["weight"][layer].T + t["bias"][layer]
        return F.gelu(x @ t["w1"][layer].T + t["b1"][layer]) @ t["w2"][layer].T + t["b2"][layer]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (metadata as strings, as the format requires)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, **{k: str(v) for k, v in self.metadata.items()}}
        save_file(self.tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScorerWeights:
        """Read a file written by :meth:`save`; a one-line ``ValueError`` if it is not one."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no scorer weights file {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types for a foreign file
            raise ValueError(f"{path} is not a scorer weights file: {exc}") from None
        if metadata.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a kvsqueeze scorer weights file (format {FORMAT!r})")
        return cls(tensors, metadata)

    def describe(self) -> str:
        """One line: kind, layers, heads, size and provenance."""
        facts = json.dumps(
            {k: self.metadata[k] for k in ("model", "documents", "tokens") if k in self.metadata}
        )
        return (
            f"{self.kind} scorer, {self.num_layers} layers x {self.num_kv_heads} KV heads, "
            f"{self.nbytes() / 1024:.0f} KiB, {facts}"
        )


class LearnedScorer(Scorer):
    """Predicted log KVzip score of every row appended in this call, from the attention input."""

    name: ClassVar[str] = "learned"
    needs_hidden_states: ClassVar[bool] = True

    def __init__(self, weights: ScorerWeights) -> None:
        self.weights = weights

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        if obs.hidden_states is None:
            raise ValueError("the learned scorer needs the attention inputs; build the cache with the model")
        if obs.num_kv_heads != self.weights.num_kv_heads or obs.layer_idx >= self.weights.num_layers:
            raise ValueError(
                f"scorer weights for {self.weights.num_layers} layers x {self.weights.num_kv_heads} KV heads "
                f"do not fit layer {obs.layer_idx} with {obs.num_kv_heads} KV heads"
            )
        tokens = self.weights.predict(obs.layer_idx, obs.hidden_states).transpose(1, 2)  # (B, H_kv, q)
        return rows_from_tokens(tokens, obs)


def rows_from_tokens(tokens: torch.Tensor, obs: Observation) -> torch.Tensor:
    """Per-token scores of this call (B, H_kv, q) laid out as the stored rows (B, H_kv, T).

    This call's tokens sit at consecutive positions ending at the last query's; a stored row from an
    earlier call scores the lowest finite value (it is a row, but this call cannot score it), an empty
    slot -inf.
    """
    q = tokens.shape[-1]
    last = obs.query_positions[:, -1].long()[:, None, None]  # (B, 1, 1)
    index = obs.key_positions.long() - last + (q - 1)  # (B, H_kv, T) index into this call's tokens
    inside = obs.key_valid & (index >= 0) & (index < q)
    rows = torch.gather(tokens, 2, index.clamp(0, q - 1)).masked_fill(~inside, torch.finfo(torch.float32).min)
    return rows.masked_fill(~obs.key_valid, float("-inf"))
