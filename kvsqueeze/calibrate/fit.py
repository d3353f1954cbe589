"""Fit a learned scorer (KVzap) to native KVzip scores on offline documents, resumably.

For each calibration document (:mod:`kvsqueeze.calibrate.documents`, inside the chat template's user turn
as a real prompt is), one prefill records every layer's attention inputs and :mod:`kvsqueeze.methods.kvzip`
replays the document to score its rows. The pairs (hidden state of a token, log of its KVzip score per KV
head) feed a ridge regression per layer through its sufficient statistics (``X^T X``, ``X^T y``, float64),
so memory does not grow with the data and the state after each document is a small file: an interrupted
calibration resumes from the last finished document. The last documents are held out and give each
layer's R^2.

``student="mlp"`` fits KVzap's two-layer MLP instead (:mod:`kvsqueeze.calibrate.mlp`): it needs rows, so
each document also leaves a fixed random sample of its rows in a shard beside the state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.cache import SqueezeCache
from kvsqueeze.cache.replay import ReplayText
from kvsqueeze.calibrate.documents import calibration_documents
from kvsqueeze.calibrate.mlp import fit_layer_mlp, r2_score
from kvsqueeze.methods.kvzip import KVzip
from kvsqueeze.scorers.learned import ScorerWeights

LOG_FLOOR = 1e-8  # scores below this are one value to the regression
STUDENTS = ("linear", "mlp")


@dataclass
class RidgeStatistics:
    """Per-layer sufficient statistics of ``y = [x, 1] @ W``: (N, D+1, D+1), (N, D+1, H_kv), (N, H_kv)."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: torch.Tensor
    ysum: torch.Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, layers: int, dim: int, heads: int) -> RidgeStatistics:
        f64 = torch.float64
        return cls(
            torch.zeros(layers, dim + 1, dim + 1, dtype=f64),
            torch.zeros(layers, dim + 1, heads, dtype=f64),
            torch.zeros(layers, heads, dtype=f64),
            torch.zeros(layers, heads, dtype=f64),
        )

    def add(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x`` (R, D) with targets ``y`` (R, H_kv) to ``layer``."""
        xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        y = y.double()
        self.xtx[layer] += xa.T @ xa
        self.xty[layer] += xa.T @ y
        self.yty[layer] += (y * y).sum(0)
        self.ysum[layer] += y.sum(0)
        if layer == 0:
            self.rows += x.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """Ridge weights (N, D+1, H_kv); the intercept is not penalized."""
        penalty = torch.eye(self.xtx.shape[-1], dtype=torch.float64) * ridge
        penalty[-1, -1] = 0.0
        return torch.linalg.solve(self.xtx + penalty, self.xty)

    def r2(self, weights: torch.Tensor) -> torch.Tensor:
        """R^2 of ``weights`` (N, D+1, H_kv) on these statistics' rows, (N, H_kv)."""
        rss = (
            self.yty
            - 2 * (weights * self.xty).sum(1)
            + torch.einsum("ldh,lde,leh->lh", weights, self.xtx, weights)
        )
        tss = self.yty - self.ysum**2 / max(1, self.rows)
        return 1 - rss / tss.clamp(min=1e-12)


@dataclass
class CalibrationState:
    """What a calibration has done so far (saved after every document)."""

    train: RidgeStatistics
    held_out: RidgeStatistics
    done: int = 0
    seconds: float = 0.0
    settings: dict[str, int] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "train": vars(self.train),
                "held_out": vars(self.held_out),
                "done": self.done,
                "seconds": self.seconds,
                "settings": self.settings,
            },
            tmp,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, settings: dict[str, int]) -> CalibrationState | None:
        """The saved state if it was made with the same ``settings``, else None."""
        if not path.is_file():
            return None
        data = torch.load(path, weights_only=True)
        saved = dict(data.get("settings") or {})
        if "mlp_rows" not in settings:  # an MLP calibration's statistics serve a linear fit too
            saved.pop("mlp_rows", None)
        if saved != settings:
            return None
        return cls(
            RidgeStatistics(**data["train"]),
            RidgeStatistics(**data["held_out"]),
            data["done"],
            data["seconds"],
            data["settings"],
        )


@dataclass
class CalibrationResult:
    weights: ScorerWeights
    documents: int
    tokens: int  # training rows per layer
    seconds: float
    held_out_r2: float  # mean over layers and heads


def document_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, kvzip: KVzip
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the attention inputs (L, D) and KVzip scores (L, H_kv) of one prompt ``ids`` (1, L)."""
    source = SqueezeCache(model, "full", record_prefill=True, tokenizer=tokenizer)
    model(ids, cache=source, logits_to_keep=1)
    scores = source.replay_scores(kvzip)
    hidden = [layer.recorded.hidden_states[0] for layer in source.layers]
    return hidden, [s[0].T for s in scores]


def row_sample(index: int, scored: slice, rows: int) -> torch.Tensor:
    """The positions of document ``index`` whose rows an MLP calibration keeps: a seeded sample of ``scored``."""
    positions = torch.arange(scored.start, scored.stop)
    g = torch.Generator().manual_seed(index)
    return positions[torch.randperm(len(positions), generator=g)[:rows]].sort().values


def load_row_shards(folder: Path, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled rows of documents ``indices``: inputs (N, R, D) and log scores (N, R, H_kv)."""
    shards = [torch.load(folder / f"{i:04d}.pt", weights_only=True) for i in indices]
    return torch.cat([s["x"] for s in shards], 1), torch.cat([s["y"] for s in shards], 1)


def teacher_name(kvzip: KVzip) -> str:
    """``kvzip`` or ``kvzip+``: what a scorer's targets were."""
    return "kvzip+" if kvzip.plus else "kvzip"


@torch.inference_mode()
def calibrate_kvzap(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state_path: Path,
    *,
    documents: int = 48,
    tokens: int = 2048,
    held_out: int = 4,
    ridge: float = 1.0,
    teacher: KVzip | None = None,
    student: str = "linear",
    mlp_hidden: int = 64,
    mlp_rows: int = 1024,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Fit per-layer linear maps from attention inputs to log KVzip scores; resumes from ``state_path``.

    ``teacher`` is the kvzip whose scores are the targets (default: ``KVzip()``; ``KVzip(plus=True)`` fits
    KVzip+ scores, the KVzap paper's targets). ``student="mlp"`` fits a two-layer MLP of ``mlp_hidden``
    units per layer on ``mlp_rows`` sampled rows of each document."""
    from tqdm.auto import tqdm

    if documents <= held_out:
        raise ValueError(f"calibration needs more documents ({documents}) than it holds out ({held_out})")
    if student not in STUDENTS:
        raise ValueError(f"student must be one of {STUDENTS}, got {student!r}")
    config = model.config.get_text_config(decoder=True)
    layers, dim, heads = config.num_hidden_layers, config.hidden_size, config.num_key_value_heads
    kvzip = teacher if teacher is not None else KVzip()
    settings = {"documents": documents, "tokens": tokens, "held_out": held_out}
    if kvzip.plus:  # a KVzip-fitted state saved before KVzip+ existed still resumes
        settings["plus"] = 1
    shards = state_path.with_suffix(".rows")
    if student == "mlp":  # its documents also leave row samples
        settings["mlp_rows"] = mlp_rows
    state = CalibrationState.load(state_path, settings) or CalibrationState(
        RidgeStatistics.zeros(layers, dim, heads),
        RidgeStatistics.zeros(layers, dim, heads),
        settings=settings,
    )
    header = ReplayText.for_tokenizer(tokenizer).header
    texts = calibration_documents(tokenizer, documents, tokens)
    bar = tqdm(total=documents, initial=state.done, desc="calibrate kvzap", unit="doc", disable=not progress)
    for index in range(state.done, documents):
        start = time.perf_counter()
        ids = torch.tensor([header + texts[index]])
        hidden, scores = document_scores(model, tokenizer, ids, kvzip)
        target = state.held_out if index >= documents - held_out else state.train
        # the targets leave out the header (no replay repeats it) and the sinks (always kept)
        scored = slice(max(len(header), kvzip.sinks), ids.shape[1])
        logs = [scores[layer][scored].clamp(min=LOG_FLOOR).log() for layer in range(layers)]  # (L', H_kv)
        for layer in range(layers):
            target.add(layer, hidden[layer][scored], logs[layer])
        if student == "mlp":
            keep = row_sample(index, scored, mlp_rows) - scored.start
            x = torch.stack([h[scored][keep] for h in hidden]).bfloat16()  # (N, R, D)
            y = torch.stack([log[keep] for log in logs]).float()  # (N, R, H_kv)
            shards.mkdir(parents=True, exist_ok=True)
            torch.save({"x": x, "y": y}, shards / f"{index:04d}.pt")
        state.done, state.seconds = index + 1, state.seconds + time.perf_counter() - start
        state.save(state_path)
        bar.update(1)
    bar.close()
    if student == "mlp":
        tensors, r2, extra = fit_mlp_student(shards, documents, held_out, mlp_hidden, progress)
    else:
        solved = state.train.solve(ridge)  # (N, D+1, H_kv)
        r2 = float(state.held_out.r2(solved).mean())
        tensors = {"weight": solved[:, :-1].transpose(1, 2).float(), "bias": solved[:, -1].float()}
        extra = {"ridge": str(ridge)}
    meta = {
        **(metadata or {}),
        "kind": student,
        "target": f"log {teacher_name(kvzip)} score",
        "documents": str(documents),
        "tokens": str(state.train.rows),
        "document_tokens": str(tokens),
        **extra,
        "held_out_r2": f"{r2:.4f}",
        "seconds": f"{state.seconds:.0f}",
    }
    return CalibrationResult(ScorerWeights(tensors, meta), documents, state.train.rows, state.seconds, r2)


def fit_mlp_student(
    shards: Path, documents: int, held_out: int, hidden: int, progress: bool
) -> tuple[dict[str, torch.Tensor], float, dict[str, str]]:
    """Per-layer MLPs on the row shards: the stacked tensors, the mean held-out R^2, and metadata."""
    from tqdm.auto import tqdm

    x, y = load_row_shards(shards, range(documents - held_out))  # (N, R, D), (N, R, H_kv)
    x_held, y_held = load_row_shards(shards, range(documents - held_out, documents))
    bar = tqdm(range(x.shape[0]), desc="fit mlp", unit="layer", disable=not progress)
    per_layer = [fit_layer_mlp(x[layer], y[layer], hidden, seed=layer) for layer in bar]
    weights = ScorerWeights({name: torch.stack([t[name] for t in per_layer]) for name in per_layer[0]})
    r2 = torch.stack([r2_score(weights.predict(n, x_held[n]), y_held[n]) for n in range(x.shape[0])])
    return weights.tensors, float(r2.mean()), {"hidden": str(hidden), "mlp_rows": str(x.shape[1])}
