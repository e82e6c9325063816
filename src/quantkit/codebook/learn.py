"""Joint learning of codebooks and mappings (JLCM) for one layer, on layer-output reconstruction.

Objective: the layer output error on calibration inputs ``X``, ``L(W_hat) = ||X (W_hat - W)^T||^2 =
sum_r (w_hat_r - w_r) H (w_hat_r - w_r)^T`` with ``H = X^T X`` (accumulated once, see
:mod:`quantkit.codebook.calib`), normalised by ``||X W^T||^2``. Bias and activations play no part in it.

Per iteration:

1. codebooks take an Adam step along ``dL/dC`` (the gradient of the gathered weight, scattered to the codewords
   it came from; shared codebooks also learn their per-group scales);
2. the mapping (codeword indices) moves:

   * ``proximal`` (default, ours): each index may move to a codeword at most ``radius`` positions away in its
     ascending codebook (1 = neighbours only). The score of a move by ``delta`` in value is the exact change of
     the loss for that single move, ``2 * delta * R[r, j] + delta**2 * H[j, j]`` with ``R = (W_hat - W) H``: the
     straight-through gain ``-2 * delta * R`` weighted down by a penalty growing with the codeword distance.
     Only improving moves are taken, at most ``max_change`` of all indices per step (the most improving ones),
     since simultaneous moves interact through the off-diagonal of ``H``;
   * ``ste`` (plain straight-through, the ablation): latent float weights take an Adam step along the same
     gradient and every index is reset to the nearest codeword of its latent weight, with no distance penalty,
     no window and no cap.

3. every ``eval_every`` iterations the error on the held-out Gram matrix is measured with the codebooks rounded
   to fp16 as stored; the best state is kept and learning stops after ``patience`` evaluations without progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from quantkit.codebook.grouping import group_rows
from quantkit.codebook.init import kmeans_1d
from quantkit.formats.pack import pack_codebook
from quantkit.formats.spec import CodebookFormat

__all__ = ["LearnSettings", "CodebookFit", "fit_codebook", "proximal_update", "output_error"]

UPDATES = ("proximal", "ste")


@dataclass(frozen=True)
class LearnSettings:
    """How a codebook weight is learned (not stored: the format is :class:`~quantkit.formats.spec.CodebookFormat`).

    Args:
        iterations: the iteration budget (0 = k-means initialisation only).
        lr: Adam step of the codebooks, relative to the mean ``|codeword|``.
        update: ``"proximal"`` (ours) or ``"ste"`` (plain straight-through, for the ablation).
        max_change: proximal only: the largest fraction of indices changed per iteration.
        radius: proximal only: the farthest codeword (in positions of the ascending codebook) a move may reach.
        ste_lr: ste only: Adam step of the latent weights, relative to the weight std.
        eval_every, patience: held-out evaluation period, and evaluations without progress before stopping.
        damping: diagonal damping of the training Gram matrix, relative to its mean diagonal.
        weighted_init: weight the k-means initialisation by the input second moments (else plain k-means).
        seed: seed of the row-grouping k-means.
    """

    iterations: int = 100
    lr: float = 0.003
    update: str = "proximal"
    max_change: float = 0.01
    radius: int = 1
    ste_lr: float = 0.003
    eval_every: int = 5
    patience: int = 3
    damping: float = 1e-4
    weighted_init: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {list(UPDATES)}, got {self.update!r}")
        if self.iterations < 0 or self.eval_every < 1 or self.patience < 1 or self.radius < 1:
            raise ValueError("iterations >= 0, eval_every >= 1, patience >= 1 and radius >= 1 are required")
        if not 0.0 < self.max_change <= 1.0:
            raise ValueError(f"max_change must be in (0, 1], got {self.max_change}")


@dataclass
class CodebookFit:
    """A learned codebook weight, unpacked: indices in original row order, groups, fp16 codebooks and scales."""

    fmt: CodebookFormat
    codes: torch.Tensor  # int64 [O, K], original row order
    row_group: torch.Tensor  # int64 [O]
    codebook: torch.Tensor  # float16 [G or 1, 2**bits], ascending rows
    scale: torch.Tensor | None  # float16 [G] (shared codebook) or None
    history: dict = field(default_factory=dict)

    def table(self) -> torch.Tensor:
        """float32 ``[G, 2**bits]`` effective codewords of each group, exactly as decoding computes them."""
        cb = self.codebook.to(torch.float32)
        return cb if self.scale is None else self.scale.to(torch.float32).view(-1, 1) * cb.view(1, -1)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[O, K]`` weight in original row order."""
        return self.table()[self.row_group].gather(1, self.codes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors (``weight_codes``, ``weight_codebook``, ``weight_row_group``, ``weight_scale``)."""
        g = self.fmt.row_groups(self.codes.shape[0])
        codes, row_group = pack_codebook(self.codes, self.row_group, self.fmt.bits, g)
        out = {"weight_codes": codes, "weight_codebook": self.codebook.clone(), "weight_row_group": row_group}
        if self.scale is not None:
            out["weight_scale"] = self.scale.clone()
        return out


def output_error(w_hat: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative layer output error ``||X (W_hat - W)^T||^2 / ||X W^T||^2`` from the Gram matrix ``H = X^T X``."""
    d = (w_hat - weight).to(torch.float64)
    w = weight.to(torch.float64)
    g = gram.to(torch.float64)
    return float((d * (d @ g)).sum() / (w * (w @ g)).sum().clamp_min(1e-300))


def proximal_update(idx: torch.Tensor, table_rows: torch.Tensor, resid: torch.Tensor, gram: torch.Tensor,
                    max_change: float, radius: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One proximal mapping step (see the module docstring).

    Rows are independent terms of the loss, but moves within a row interact through ``H``'s off-diagonal; so a
    step is ``ceil(max_change * K)`` rounds in which every row takes its single best improving move and its
    residual is updated exactly (``R[r] += delta * H[j]``). Each accepted move therefore lowers the training loss
    by exactly its score, and at most ``max_change`` of a row's indices change per step.

    Args:
        idx: int64 ``[O, K]`` current indices.
        table_rows: ``[O, C]`` ascending codewords available to each row.
        resid: ``R = (W_hat - W) H``, ``[O, K]`` (updated in place).
        gram: ``H``, ``[K, K]`` (symmetric).
        max_change: largest fraction of a row's indices that may change in this step.
        radius: largest move, in codebook positions (1 = neighbours only).

    Returns:
        ``(new indices, updated residual, number of indices changed)``.
    """
    o, k = idx.shape
    c = table_rows.shape[1]
    hdiag = torch.diagonal(gram)
    idx = idx.clone()
    rounds = max(1, math.ceil(max_change * k))
    changed = torch.zeros(o, k, dtype=torch.bool)
    rows = torch.arange(o)
    for _ in range(rounds):
        cur = table_rows.gather(1, idx)
        best = torch.zeros_like(resid)
        best_k = idx.clone()
        for r in range(1, radius + 1):
            for sign in (-1, 1):
                k2 = idx + sign * r
                valid = (k2 >= 0) & (k2 < c) & ~changed  # an index moves at most once per step
                k2 = k2.clamp(0, c - 1)
                delta = table_rows.gather(1, k2) - cur
                gain = 2 * delta * resid + delta * delta * hdiag
                gain = torch.where(valid, gain, torch.full_like(gain, math.inf))
                better = gain < best
                best = torch.where(better, gain, best)
                best_k = torch.where(better, k2, best_k)
        gain, j = best.min(dim=1)
        take = gain < 0
        if not bool(take.any()):
            break
        r_sel, j_sel = rows[take], j[take]
        k_new = best_k[r_sel, j_sel]
        delta = table_rows[r_sel, k_new] - cur[r_sel, j_sel]
        idx[r_sel, j_sel] = k_new
        changed[r_sel, j_sel] = True
        resid[r_sel] += delta.view(-1, 1) * gram[j_sel]
    return idx, resid, int(changed.sum())


def _init_codebooks(w: torch.Tensor, rg: torch.Tensor, g: int, fmt: CodebookFormat, colw: torch.Tensor):
    c = fmt.codebook_size
    o, k = w.shape
    wts = colw.view(1, k).expand(o, k)
    if fmt.shared:
        scale = torch.ones(g)
        for j in range(g):
            rows = w[rg == j]
            if rows.numel():
                scale[j] = rows.pow(2).mean().sqrt().clamp_min(1e-8)
        scale = scale.to(torch.float16).to(torch.float32).clamp_min(1e-6)
        z = w / scale[rg].view(-1, 1)
        return kmeans_1d(z, c, wts).view(1, c), scale
    cb = torch.empty(g, c)
    for j in range(g):
        m = rg == j
        cb[j] = kmeans_1d(w[m], c, wts[m]) if m.any() else torch.linspace(-1, 1, c) * float(w.std())
    return cb, None


def _table(cb: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return cb if scale is None else scale.view(-1, 1) * cb.view(1, -1)


def _assign(values: torch.Tensor, rg: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest codeword of every element in its row's ascending codebook (= bucketize on the midpoints)."""
    rows = table[rg]  # [O, C]
    mids = (rows[:, 1:] + rows[:, :-1]) / 2
    return (values.unsqueeze(-1) > mids.unsqueeze(1)).sum(-1)


def _sort_codebooks(cb: torch.Tensor, scale, idx, rg, opt) -> None:
    """Keep every codebook ascending after a gradient step (neighbour moves rely on it), remapping the indices
    and the optimizer state with it."""
    order = torch.argsort(cb, dim=1)
    if torch.equal(order, torch.arange(cb.shape[1]).expand_as(order)):
        return
    inv = torch.argsort(order, dim=1)
    cb.copy_(cb.gather(1, order))
    state = opt.state.get(cb, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].copy_(state[key].gather(1, order))
    if cb.shape[0] == 1:
        idx.copy_(inv[0][idx])
    else:
        idx.copy_(inv[rg].gather(1, idx))


def fit_codebook(weight: torch.Tensor, fmt: CodebookFormat, h_train: torch.Tensor, h_val: torch.Tensor | None = None,
                 col_weight: torch.Tensor | None = None, settings: LearnSettings | None = None) -> CodebookFit:
    """Learn a codebook weight for one layer.

    Args:
        weight: the float weight ``[O, ...]`` (flattened to ``[O, K]``).
        fmt: bits, number of row groups and codebook sharing.
        h_train: ``X^T X`` of the training calibration inputs, ``[K, K]`` (any positive scale).
        h_val: the same on held-out inputs (early stopping); None = use ``h_train``.
        col_weight: ``E[x_j^2]`` per input column for the initialisation (None = ``diag(h_train)``).
        settings: the learning settings.

    Returns:
        The learned weight; ``history`` holds the held-out error at initialisation and at the end, the
        iterations run and the fraction of indices changed.
    """
    s = settings or LearnSettings()
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    o, k = w.shape
    if h_train.shape != (k, k):
        raise ValueError(f"Gram matrix has shape {tuple(h_train.shape)}, the layer needs ({k}, {k})")
    g = fmt.row_groups(o)
    h = h_train.to(torch.float32)
    hd = torch.diagonal(h).clone()
    h = h + s.damping * float(hd.mean().clamp_min(1e-30)) * torch.eye(k)
    hv = (h_train if h_val is None else h_val).to(torch.float32)
    colw = hd if col_weight is None else col_weight.reshape(-1).to(torch.float32)
    if not s.weighted_init:
        colw = torch.ones(k)
    lref = float((w * (w @ h)).sum().clamp_min(1e-30))

    rg = group_rows(w, g, seed=s.seed)
    cb, scale = _init_codebooks(w, rg, g, fmt, colw)
    idx = _assign(w, rg, _table(cb, scale))

    def val_error(cb_, scale_, idx_):
        t = _table(cb_.to(torch.float16).to(torch.float32),
                   None if scale_ is None else scale_.to(torch.float16).to(torch.float32))
        return output_error(t[rg].gather(1, idx_), w, hv)

    init_err = val_error(cb, scale, idx)
    best = (init_err, cb.clone(), None if scale is None else scale.clone(), idx.clone(), 0)
    hist = {"init_val_error": init_err, "val_errors": [init_err], "changed": 0}
    if s.iterations:
        cb = cb.clone().requires_grad_(False)
        params = [{"params": [cb], "lr": s.lr * float(cb.abs().mean().clamp_min(1e-12))}]
        if scale is not None:
            scale = scale.clone()
            params.append({"params": [scale], "lr": s.lr * float(scale.abs().mean())})
        opt = torch.optim.Adam(params)
        latent = opt_v = None
        if s.update == "ste":
            latent = w.clone()
            opt_v = torch.optim.Adam([latent], lr=s.ste_lr * float(w.std().clamp_min(1e-12)))
        since_best = 0
        changed = 0
        for it in range(1, s.iterations + 1):
            table = _table(cb, scale)
            d = table[rg].gather(1, idx) - w
            grad_w = (2.0 / lref) * (d @ h)
            # Codebook gradient: scatter the gathered weights' gradient onto the codewords they read.
            ge = torch.zeros(g * fmt.codebook_size).index_add_(
                0, (rg.view(-1, 1) * fmt.codebook_size + idx).reshape(-1), grad_w.reshape(-1)
            ).view(g, fmt.codebook_size)
            if scale is None:
                cb.grad = ge
            else:
                cb.grad = (scale.view(-1, 1) * ge).sum(0, keepdim=True)
                scale.grad = (ge * cb).sum(1)
            opt.step()
            with torch.no_grad():
                if scale is not None:
                    scale.clamp_(min=1e-6)
                _sort_codebooks(cb, scale, idx, rg, opt)
                table = _table(cb, scale)
                rows = table[rg]
                d = rows.gather(1, idx) - w
                resid = d @ h
                if s.update == "proximal":
                    idx, resid, n = proximal_update(idx, rows, resid, h, s.max_change, s.radius)
                else:
                    latent.grad = (2.0 / lref) * resid
                    opt_v.step()
                    new = _assign(latent, rg, table)
                    n = int((new != idx).sum())
                    idx = new
                changed += n
            if it % s.eval_every == 0 or it == s.iterations:
                err = val_error(cb, scale, idx)
                hist["val_errors"].append(err)
                if err < best[0]:
                    best = (err, cb.clone(), None if scale is None else scale.clone(), idx.clone(), it)
                    since_best = 0
                else:
                    since_best += 1
                    if since_best >= s.patience:
                        break
        hist["iterations_run"] = it
        hist["changed_fraction"] = changed / (o * k)
    err, cb, scale, idx, best_it = best
    hist.update(final_val_error=err, best_iteration=best_it)
    return CodebookFit(fmt=fmt, codes=idx, row_group=rg, codebook=cb.to(torch.float16),
                       scale=None if scale is None else scale.to(torch.float16), history=hist)
