"""Paired statistics and the Frechet distance shared by every evaluation."""

import numpy as np
import pytest
from scipy.stats import wilcoxon

from quantkit.stats import bootstrap_indices, frechet_distance_from_features, interval95, paired_mean_difference


def test_paired_difference_of_identical_values_is_an_exact_zero():
    a = np.random.default_rng(0).normal(size=40)
    r = paired_mean_difference(a, a.copy(), n_boot=200)
    assert r == {"diff": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0, "a_higher": 0, "b_higher": 0, "images": 40}


def test_paired_difference_against_a_direct_computation():
    rng = np.random.default_rng(1)
    b = rng.normal(30, 2, size=64)
    a = b + rng.normal(0.5, 0.3, size=64)  # a is higher on almost every image
    r = paired_mean_difference(a, b, n_boot=500, seed=3)
    d = a - b
    assert r["diff"] == pytest.approx(d.mean())
    assert r["p_value"] == pytest.approx(wilcoxon(d).pvalue) and r["p_value"] < 1e-6
    assert (r["a_higher"], r["b_higher"]) == (int((d > 0).sum()), int((d < 0).sum()))
    boot = d[bootstrap_indices(64, 500, seed=3)].mean(1)
    assert r["ci95"] == interval95(boot) and r["ci95"][0] < d.mean() < r["ci95"][1]
    assert r["ci95"][0] > 0  # the interval excludes 0 for a consistent shift
    pure_noise = paired_mean_difference(b + rng.normal(0, 0.3, size=64), b, n_boot=500)
    assert pure_noise["ci95"][0] < 0 < pure_noise["ci95"][1] or pure_noise["p_value"] > 0.01


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same, non-zero length"):
        paired_mean_difference(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="same, non-zero length"):
        paired_mean_difference(np.zeros(0), np.zeros(0))


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40000, 3))
    # N(0, I) vs N(mu, 4 I): |mu|^2 + tr(I) + tr(4I) - 2 tr(2I) = |mu|^2 + 3
    mu = np.array([1.0, -2.0, 0.5])
    y = rng.normal(size=(40000, 3)) * 2 + mu
    assert frechet_distance_from_features(x, y) == pytest.approx(mu @ mu + 3.0, rel=0.02)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="two samples"):
        frechet_distance_from_features(x[:1], y)
