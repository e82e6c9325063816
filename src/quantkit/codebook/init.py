"""Codebook initialisation: 1-D k-means of a group's weights, weighted by the layer's input second moments.

The weight of weight element ``W[r, j]`` is ``E[x_j^2]`` (``diag(X^T X)`` of the calibration inputs): the
first-order importance of column ``j`` in the layer output error ``||X (W - W_hat)^T||^2``.
"""

from __future__ import annotations

import torch

__all__ = ["kmeans_1d", "nearest_codeword"]


def kmeans_1d(values: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 25) -> torch.Tensor:
    """Weighted 1-D k-means (Lloyd, initialised at weighted quantiles). Returns ``k`` ascending centroids (fp32).

    Args:
        values: any shape (flattened).
        k: number of centroids.
        weights: non-negative weights, same number of elements (None = uniform).
    """
    v = values.reshape(-1).to(torch.float64)
    w = torch.ones_like(v) if weights is None else weights.reshape(-1).to(torch.float64).clamp_min(0)
    if v.numel() == 0:
        return torch.linspace(-1, 1, k)
    if float(w.sum()) <= 0:
        w = torch.ones_like(v)
    order = torch.argsort(v)
    vs, ws = v[order], w[order]
    cdf = torch.cumsum(ws, 0) / ws.sum()
    qs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = vs[torch.searchsorted(cdf, qs).clamp(max=vs.numel() - 1)]
    for _ in range(iters):
        mids = (c[1:] + c[:-1]) / 2
        lab = torch.bucketize(vs, mids)
        num = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, ws * vs)
        den = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, ws)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), c)
        new = torch.sort(new).values
        if torch.allclose(new, c, rtol=0, atol=1e-12 * float(vs.abs().max().clamp_min(1e-30))):
            c = new
            break
        c = new
    return c.to(torch.float32)


def nearest_codeword(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an ascending ``codebook`` ``[C]`` for every element of ``values`` (int64)."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values.contiguous(), mids.contiguous())
