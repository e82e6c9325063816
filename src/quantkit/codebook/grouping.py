"""Neuron (output-row) grouping of JLCM: a per-row descriptor, k-means into ``G`` groups.

Rows with similar weight distributions share a codebook (or a codebook shape with their own scale). The
descriptor of a row is its sorted normalised quantiles (the shape of its distribution) and its log standard
deviation (its scale), so k-means on descriptors groups rows a single codebook fits well.
"""

from __future__ import annotations

import torch

__all__ = ["row_descriptors", "kmeans", "group_rows"]

_QUANTILES = (0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.98)


def row_descriptors(weight: torch.Tensor, scale_weight: float = 2.0) -> torch.Tensor:
    """``[O, 10]`` descriptor per output row of ``weight`` (``[O, ...]``, flattened to ``[O, K]``).

    Columns: the 2/10/25/40/50/60/75/90/98 % quantiles of the row standardised by its own mean and std (the
    shape), then the row's log std standardised over the rows and times ``scale_weight`` (the scale: a codebook
    serves rows of one scale).
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    mean = w.mean(dim=1, keepdim=True)
    std = w.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-12)
    z = (w - mean) / std
    q = torch.quantile(z, torch.tensor(_QUANTILES), dim=1).T  # [O, 9]
    logstd = torch.log(std)
    logstd = (logstd - logstd.mean()) / logstd.std(unbiased=False).clamp_min(1e-6)
    return torch.cat([q, scale_weight * logstd], dim=1)


def kmeans(points: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (deterministic for a seed).

    Args:
        points: ``[N, D]``.
        k: clusters (``<= N``).

    Returns:
        ``(labels int64 [N], centroids [k, D])``; a cluster that empties keeps its last centroid.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k={k}")
    x = points.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    cent = [x[int(torch.randint(n, (1,), generator=gen))]]
    d2 = ((x - cent[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than clusters: duplicate centroids, clusters stay empty
            cent.append(cent[-1])
            continue
        i = int(torch.multinomial(d2 / total, 1, generator=gen))
        cent.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(cent)
    labels = torch.zeros(n, dtype=torch.int64)
    for _ in range(iters):
        labels_new = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, labels_new, x)
        counts = torch.bincount(labels_new, minlength=k).to(x.dtype).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        if torch.equal(labels_new, labels):
            break
        labels = labels_new
    return labels, c.to(points.dtype)


def group_rows(weight: torch.Tensor, groups: int, seed: int = 0) -> torch.Tensor:
    """Group id ``int64 [O]`` of every output row: k-means on :func:`row_descriptors`.

    Groups are numbered by increasing mean log-std, so the numbering is canonical (independent of the seeding)
    and ``groups == 1`` gives all zeros.
    """
    o = weight.shape[0]
    g = min(groups, o)
    if g <= 1:
        return torch.zeros(o, dtype=torch.int64)
    desc = row_descriptors(weight)
    labels, _ = kmeans(desc, g, seed=seed)
    logstd = desc[:, -1]
    key = torch.tensor([float(logstd[labels == j].mean()) if (labels == j).any() else float("inf") for j in range(g)])
    rank = torch.empty(g, dtype=torch.int64)
    rank[torch.argsort(key, stable=True)] = torch.arange(g)
    return rank[labels]
