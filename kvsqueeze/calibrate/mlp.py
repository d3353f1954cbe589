"""Fit KVzap's two-layer MLP student per layer: ``gelu(x W1^T + b1) W2^T + b2`` -> log teacher score per KV head.

The linear student is a closed-form ridge fit on sufficient statistics (:mod:`kvsqueeze.calibrate.fit`); the
MLP needs rows, so a calibration that fits one keeps a fixed random sample of each document's rows. Inputs
and targets are standardized while training (the attention inputs of some models have outlier channels in
the hundreds) and the standardization is folded back into ``W1, b1, W2, b2``, so the saved file is the plain
MLP :class:`~kvsqueeze.scorers.learned.ScorerWeights` evaluates. A tenth of the training rows stops the
training early; the held-out documents only measure R^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def r2_score(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """R^2 per output column of ``predicted`` against ``target``, both (R, H)."""
    rss = ((predicted - target) ** 2).sum(0)
    tss = ((target - target.mean(0)) ** 2).sum(0).clamp(min=1e-12)
    return 1 - rss / tss


@torch.inference_mode(False)  # the calibration runs in inference mode; training needs autograd
@torch.enable_grad()
def fit_layer_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: int,
    *,
    epochs: int = 60,
    batch: int = 512,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    patience: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One layer's MLP from rows ``x`` (R, D) to targets ``y`` (R, H_kv); returns ``w1 b1 w2 b2`` (unbatched)."""
    x, y = x.float().clone(), y.float().clone()  # tensors made in inference mode cannot enter autograd
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g)
    stop = order[: max(1, x.shape[0] // 10)]
    train = order[max(1, x.shape[0] // 10) :]
    x_mean, x_std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)  # (D,)
    y_mean, y_std = y[train].mean(0), y[train].std(0).clamp(min=1e-6)  # (H,)
    xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std

    dim, heads = x.shape[1], y.shape[1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        first, second = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, heads)
    params = [*first.parameters(), *second.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def predict(rows: torch.Tensor) -> torch.Tensor:
        return second(F.gelu(first(rows)))

    best, best_state, waited = float("inf"), None, 0
    for _ in range(epochs):
        shuffled = train[torch.randperm(len(train), generator=g)]
        for start in range(0, len(shuffled), batch):
            index = shuffled[start : start + batch]
            loss = F.mse_loss(predict(xs[index]), ys[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            stop_loss = float(F.mse_loss(predict(xs[stop]), ys[stop]))
        if stop_loss < best - 1e-5:
            best, waited = stop_loss, 0
            best_state = [p.detach().clone() for p in params]
        else:
            waited += 1
            if waited >= patience:
                break
    w1, b1, w2, b2 = best_state if best_state is not None else [p.detach().clone() for p in params]
    # fold the standardization back: x -> (x - m) / s and y = y_std * out + y_mean
    return {
        "w1": w1 / x_std,  # (Hd, D)
        "b1": b1 - (w1 / x_std) @ x_mean,  # (Hd,)
        "w2": w2 * y_std[:, None],  # (H, Hd)
        "b2": b2 * y_std + y_mean,  # (H,)
    }
