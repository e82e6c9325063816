"""Statistics shared by every evaluation: Frechet distance between feature sets and paired comparisons.

Every pipeline compared by ``quantkit eval`` draws the same prompts and seeds, so image ``i`` of one pipeline pairs
with image ``i`` of another. The helpers here turn such pairs into a difference with a 95 % paired bootstrap
interval (each resample draws the same image indices for both sides) and a p-value, so a drop can be told from
the noise of this many images. NumPy and SciPy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_indices", "frechet_distance_from_features", "interval95", "paired_mean_difference"]


def frechet_distance_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(A B) = sum sqrt(eig(sqrt(A) B sqrt(A))), with symmetric PSD square roots (stable, real).
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` image indices drawn with replacement: the same rows index both sides of a pair."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def interval95(boot) -> list[float]:
    """The 2.5th and 97.5th percentiles of bootstrap replicates."""
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def paired_mean_difference(a, b, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired per-image values (e.g. CLIP scores of the same prompt and seed).

    Returns ``{"diff", "ci95", "p_value", "a_higher", "b_higher", "images"}``: the mean difference, its 95 %
    paired bootstrap interval, the two-sided Wilcoxon signed-rank p-value (1.0 when every pair is tied) and how
    many images score higher under each side.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("a paired difference needs two 1-D arrays of the same, non-zero length")
    d = a - b
    idx = bootstrap_indices(len(d), n_boot, seed)
    p = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return {"diff": float(d.mean()), "ci95": interval95(d[idx].mean(1)), "p_value": p,
            "a_higher": int(np.sum(d > 0)), "b_higher": int(np.sum(d < 0)), "images": len(d)}
