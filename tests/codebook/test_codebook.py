"""JLCM codebook backend: format round trips, size accounting, the learning updates, and the kernels."""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.codebook import LearnSettings, fit_codebook, group_rows, kmeans_1d, output_error, proximal_update
from quantkit.formats.pack import dequantize_codebook, pack_codebook, row_order, unpack_row_group
from quantkit.formats.spec import CodebookFormat, LayerScheme, bits_per_weight, format_bits_per_weight, group_id_bits
from quantkit.ops import reference
from tests.ops.samples import codebook_weight


def _problem(o=24, k=96, n=3000, rank=12, seed=0):
    """A weight and correlated (low-rank + noise) inputs, like real layer inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, k, generator=g) * (0.02 + 0.08 * torch.rand(o, 1, generator=g))
    mix = torch.randn(rank, k, generator=g) * torch.rand(k, generator=g)

    def inputs(m):
        return torch.randn(m, rank, generator=g) @ mix + 0.05 * torch.randn(m, k, generator=g)

    x, xv, xt = inputs(n), inputs(n // 2), inputs(n // 2)
    return w, x.T @ x / n, xv.T @ xv / (n // 2), xt.T @ xt / (n // 2)


@pytest.mark.parametrize("bits,groups,shared,o,k", [(2, 4, False, 13, 37), (3, 3, True, 1, 10), (4, 16, False, 7, 33),
                                                     (3, 8, False, 40, 64)])
def test_fit_tensors_round_trip_bit_exactly(bits, groups, shared, o, k):
    w, h, hv, _ = _problem(o, k, n=200, rank=4)
    fmt = CodebookFormat(bits, groups, shared)
    fit = fit_codebook(w, fmt, h, hv, settings=LearnSettings(iterations=5))
    t = fit.tensors()
    specs = fmt.tensor_specs((o, k))
    assert {n for n in specs if n != "weight_shape"} == set(t)
    for name, tensor in t.items():
        assert tuple(tensor.shape) == specs[name][0] and tensor.dtype == specs[name][1], name
    decoded = dequantize_codebook(t["weight_codes"], t["weight_codebook"], t.get("weight_scale"),
                                  t["weight_row_group"], bits, k)
    assert torch.equal(decoded, fit.dequantize())
    assert torch.equal(unpack_row_group(t["weight_row_group"], fmt.row_groups(o), o), fit.row_group)
    # Stored rows are contiguous per group, in original order inside a group.
    perm = row_order(fit.row_group)
    assert torch.all(fit.row_group[perm][1:] >= fit.row_group[perm][:-1])
    for gid in fit.row_group.unique():
        rows = perm[fit.row_group[perm] == gid]
        assert torch.all(rows[1:] > rows[:-1])


def test_pack_codebook_rejects_bad_group_ids():
    with pytest.raises(ValueError, match="row group ids"):
        pack_codebook(torch.zeros(3, 5, dtype=torch.int64), torch.tensor([0, 1, 4]), 2, 4)


@pytest.mark.parametrize("fmt,shape", [(CodebookFormat(2, 8), (64, 576)), (CodebookFormat(3, 4, True), (33, 7, 3, 3)),
                                       (CodebookFormat(4, 300 // 2), (5, 17))])
def test_bits_per_weight_counts_everything(fmt, shape):
    o, k = shape[0], math.prod(shape[1:])
    g = min(fmt.groups, o)
    expected_bytes = (4 * o * math.ceil(k / (32 // fmt.bits if fmt.bits != 3 else 10))  # packed indices
                      + 2 * (1 if fmt.shared else g) * (1 << fmt.bits)  # fp16 codebooks
                      + (2 * g if fmt.shared else 0)  # fp16 group scales
                      + 4 * math.ceil(o / (32 // group_id_bits(g) if group_id_bits(g) != 3 else 10))  # row groups
                      + 8 * len(shape))  # weight_shape
    assert format_bits_per_weight(fmt, shape) == pytest.approx(8 * expected_bytes / (o * k))
    codes, cb, scale, rg = codebook_weight(o, k, fmt.bits, fmt.groups, fmt.shared)
    stored = {"weight_codes": codes, "weight_codebook": cb, "weight_row_group": rg,
              "weight_shape": torch.tensor(shape)}
    if scale is not None:
        stored["weight_scale"] = scale
    assert bits_per_weight(stored, o * k) == pytest.approx(8 * expected_bytes / (o * k))


def test_codebook_scheme_is_weight_only():
    from quantkit.formats.spec import ActFormat

    with pytest.raises(ValueError, match="weight-only"):
        LayerScheme(CodebookFormat(3), ActFormat(8))
    assert LayerScheme(CodebookFormat(2, 16, True)).name == "cb2g16s-a16"


def test_proximal_update_neighbour_moves_cap_and_exact_decrease():
    w, h, _, _ = _problem(16, 80)
    table = torch.sort(torch.randn(16, 8) * 0.05, dim=1).values
    idx = torch.randint(0, 8, (16, 80))
    what = table.gather(1, idx)
    resid = (what - w) @ h
    loss0 = float(((what - w) * resid).sum())
    new, resid_new, n = proximal_update(idx, table, resid.clone(), h, max_change=0.05, radius=1)
    moved = new != idx
    assert n == int(moved.sum()) and n > 0
    assert int((new - idx).abs().max()) == 1  # neighbours only
    assert int(moved.sum(dim=1).max()) <= math.ceil(0.05 * 80)  # the cap, per row
    what_new = table.gather(1, new)
    loss1 = float(((what_new - w) * ((what_new - w) @ h)).sum())
    assert loss1 < loss0
    torch.testing.assert_close(resid_new, (what_new - w) @ h, rtol=1e-4, atol=1e-6)  # residual kept exact
    new2, _, _ = proximal_update(idx, table, resid.clone(), h, max_change=0.05, radius=2)
    assert int((new2 - idx).abs().max()) <= 2


def test_weighted_kmeans_follows_weights():
    v = torch.tensor([0.0, 0.0, 1.0, 1.0, 10.0, 10.0])
    c = kmeans_1d(v, 2, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    assert c.tolist() == [0.0, 1.0]
    c = kmeans_1d(v, 2)
    assert c.tolist() == [0.5, 10.0]


def test_grouping_separates_row_scales():
    w = torch.cat([torch.randn(10, 50) * 0.01, torch.randn(10, 50)])
    rg = group_rows(w, 2)
    assert rg[:10].unique().numel() == 1 and rg[10:].unique().numel() == 1 and rg[0] == 0 and rg[10] == 1


@pytest.mark.parametrize("shared", [False, True])
def test_learning_beats_initialisation_and_plain_kmeans_on_held_out_inputs(shared):
    w, h, hv, ht = _problem()
    fmt = CodebookFormat(2, 4, shared)
    plain = fit_codebook(w, fmt, h, hv, settings=LearnSettings(iterations=0, weighted_init=False))
    learned = fit_codebook(w, fmt, h, hv, settings=LearnSettings(iterations=60))
    e_plain, e_learned = output_error(plain.dequantize(), w, ht), output_error(learned.dequantize(), w, ht)
    assert learned.history["final_val_error"] <= learned.history["init_val_error"]
    assert e_learned < 0.7 * e_plain
    ste = fit_codebook(w, fmt, h, hv, settings=LearnSettings(iterations=60, update="ste"))
    assert ste.history["final_val_error"] <= ste.history["init_val_error"]


def test_reference_ops_match_gather():
    codes, cb, scale, rg = codebook_weight(9, 40, 3, 4, True)
    w = dequantize_codebook(codes, cb, scale, rg, 3, 40)
    x = torch.randn(3, 40)
    torch.testing.assert_close(reference.gemm_codebook(x, codes, cb, scale, rg, None, 3), x @ w.T)
    xc = torch.randn(2, 5, 6, 6)
    codes, cb, scale, rg = codebook_weight(4, 45, 2, 2, False)
    wc = dequantize_codebook(codes, cb, scale, rg, 2, 45).view(4, 5, 3, 3)
    out = reference.conv2d_codebook(xc, codes, cb, scale, rg, None, 2, [3, 3], [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(out, torch.nn.functional.conv2d(xc, wc, None, 1, 1))


# ---- native kernels against the reference gather -------------------------------------------------------------

def _native_has(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkit::{op}", "CPU")


native = pytest.mark.skipif(not _native_has("gemm_codebook"), reason="quantkit._C built without the codebook kernels")

KERNEL_CASES = [(2, 4, False, 37, 130), (3, 8, True, 16, 97), (4, 16, False, 33, 256), (3, 3, False, 1, 10),
                (4, 2, True, 8, 64)]


@native
@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("bits,groups,shared,o,k", KERNEL_CASES)
@pytest.mark.parametrize("m", [1, 5, 300], ids=["gemv", "gemv5", "gemm"])
def test_native_gemm_codebook_matches_reference(isa, bits, groups, shared, o, k, m):
    from quantkit.ops import native

    native.set_isa(isa)
    try:
        codes, cb, scale, rg = codebook_weight(o, k, bits, groups, shared, seed=o + k)
        x, bias = torch.randn(m, k), torch.randn(o)
        w_native = torch.ops.quantkit.dequantize_codebook(codes, cb, scale, rg, bits, k)
        assert torch.equal(w_native, reference.dequantize_codebook(codes, cb, scale, rg, bits, k))
        y = torch.ops.quantkit.gemm_codebook(x, codes, cb, scale, rg, bias, bits)
        ref = reference.gemm_codebook(x, codes, cb, scale, rg, bias, bits)
        if m > 8:
            assert torch.equal(y, ref)  # decode then the same dense GEMM
        else:
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * math.sqrt(k))
    finally:
        native.set_isa("auto")


@native
@pytest.mark.parametrize("bits,shared", [(2, False), (3, True), (4, False)])
def test_native_conv2d_codebook_matches_reference(bits, shared):
    codes, cb, scale, rg = codebook_weight(7, 5 * 9, bits, 4, shared)
    x, bias = torch.randn(2, 5, 9, 8), torch.randn(7)
    args = (x, codes, cb, scale, rg, bias, bits, [3, 3], [2, 1], [1, 1], [1, 1])
    assert torch.equal(torch.ops.quantkit.conv2d_codebook(*args), reference.conv2d_codebook(*args))


def test_calibration_records_input_second_moments():
    from quantkit.calibrate.observers import ActivationObserver

    obs = ActivationObserver(channel_dim=1)
    xs = [torch.randn(2, 3, 4, 5), torch.randn(1, 3, 4, 5) * 3]
    for x in xs:
        obs.update(x)
    expect = torch.cat([x.transpose(0, 1).reshape(3, -1) for x in xs], dim=1).pow(2).mean(1)
    torch.testing.assert_close(obs.state()["channel_sqmean"], expect)
