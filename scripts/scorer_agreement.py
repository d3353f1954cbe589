"""How often learned-scorer weights keep the rows their teacher keeps, on a calibration's held-out documents.

    .venv/bin/python scripts/scorer_agreement.py STATE.rows DOCUMENTS HELD_OUT WEIGHTS [WEIGHTS ...]

``STATE.rows`` is the row-sample folder a ``kvsqueeze calibrate --student mlp`` run leaves beside its state
(``<weights>.state.rows``); its last ``HELD_OUT`` of ``DOCUMENTS`` documents were not fitted on. For each
held-out document and each weights file it prints the share of the teacher's top rows (one top-k over
every layer and KV head of the sampled rows, at keep 0.25 and 0.1) that the weights' predictions also put
in their top-k, and the mean and spread over (layer, head) of prediction minus teacher: a spread moves whole
layers across the one global top-k. The rows are a sample of each document, so the shares estimate the
overlap the bench's selection would see.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvsqueeze.calibrate.fit import load_row_shards
from kvsqueeze.scorers.learned import ScorerWeights

KEEPS = (0.25, 0.1)


def top_share(teacher: torch.Tensor, predicted: torch.Tensor, keep: float) -> float:
    """Share of the teacher's top ``keep`` of all entries that ``predicted`` also ranks in its top ``keep``."""
    k = max(1, int(keep * teacher.numel()))
    chosen = torch.zeros(teacher.numel(), dtype=torch.bool)
    chosen[predicted.reshape(-1).topk(k).indices] = True
    return float(chosen[teacher.reshape(-1).topk(k).indices].float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rows", type=Path, help="the calibration's row-sample folder (<weights>.state.rows)")
    parser.add_argument("documents", type=int, help="the calibration's --documents")
    parser.add_argument("held_out", type=int, help="the calibration's --held-out")
    parser.add_argument("weights", nargs="+", type=Path, help="scorer weights files to compare")
    args = parser.parse_args()
    if not 1 <= args.held_out < args.documents:
        raise SystemExit(f"held_out must be in [1, documents), got {args.held_out}")
    held_out = range(args.documents - args.held_out, args.documents)
    rows = {d: load_row_shards(args.rows, range(d, d + 1)) for d in held_out}  # (N, R, D), (N, R, H_kv)
    for path in args.weights:
        weights = ScorerWeights.load(path)
        for document, (x, y) in rows.items():
            predicted = torch.stack([weights.predict(n, x[n]) for n in range(x.shape[0])])  # (N, R, H_kv)
            offset = (predicted - y).mean(1)  # (N, H_kv)
            shares = ", ".join(f"top {keep:g}: {top_share(y, predicted, keep):.3f}" for keep in KEEPS)
            print(
                f"{path.name} document {document}: {shares}; "
                f"offset {offset.mean():+.2f} (sd {offset.std():.2f} over layers and heads)"
            )


if __name__ == "__main__":
    main()
