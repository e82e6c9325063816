"""Activation observers: bounded-memory statistics of a layer's input over a calibration run.

Registered by name (``@register("minmax")``) so configs can pick them.
"""

from __future__ import annotations

import torch

__all__ = ["OBSERVERS", "register", "ActivationObserver", "PrefixObserver", "LOG2_MIN", "LOG2_MAX"]

OBSERVERS: dict[str, type] = {}

# |x| histogram range in powers of two: [2^-24, 2^24) plus an underflow bin for exact zeros / tiny values.
LOG2_MIN, LOG2_MAX = -24, 24


def register(name: str):
    """Class decorator adding an observer to :data:`OBSERVERS`."""

    def deco(cls):
        OBSERVERS[name] = cls
        return cls

    return deco


@register("minmax")
class ActivationObserver:
    """MixDQ's statistics of one layer input, plus what later stages need, in fixed memory.

    Tracks: EMA of per-batch min/max (momentum 0.95, first batch initialises), the absolute min/max, the
    per-channel absmax and second moment ``E[x^2]`` (channel = last dim for Linear inputs, dim 1 for Conv2d
    inputs; the second moment weights JLCM's codebook initialisation), and a histogram of
    ``|x|`` in log2 bins (``bins_per_octave`` per power of two), good to a few percent for percentiles.
    """

    def __init__(self, channel_dim: int, momentum: float = 0.95, bins_per_octave: int = 8):
        self.channel_dim = channel_dim
        self.momentum = momentum
        self.bins_per_octave = bins_per_octave
        self.num_bins = (LOG2_MAX - LOG2_MIN) * bins_per_octave + 1
        self.ema_min: torch.Tensor | None = None
        self.ema_max: torch.Tensor | None = None
        self.min = torch.tensor(float("inf"))
        self.max = torch.tensor(float("-inf"))
        self.channel_absmax: torch.Tensor | None = None
        self.channel_sqsum: torch.Tensor | None = None
        self.channel_count = 0
        self.hist = torch.zeros(self.num_bins, dtype=torch.float64)
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch of inputs into the statistics (kept on the input's device; :meth:`state` is on the CPU)."""
        x = x.detach().to(torch.float32)
        if self.hist.device != x.device:
            self.min, self.max, self.hist = self.min.to(x.device), self.max.to(x.device), self.hist.to(x.device)
        bmin, bmax = x.amin(), x.amax()
        if self.ema_min is None:
            self.ema_min, self.ema_max = bmin.clone(), bmax.clone()
        else:
            m = self.momentum
            self.ema_min = m * self.ema_min + (1 - m) * bmin
            self.ema_max = m * self.ema_max + (1 - m) * bmax
        self.min = torch.minimum(self.min, bmin)
        self.max = torch.maximum(self.max, bmax)
        dim = self.channel_dim % x.dim()
        reduce = [d for d in range(x.dim()) if d != dim]
        cmax = x.abs().amax(dim=reduce)
        self.channel_absmax = cmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, cmax)
        sq = x.to(torch.float64).pow(2).sum(dim=reduce)
        self.channel_sqsum = sq if self.channel_sqsum is None else self.channel_sqsum + sq
        self.channel_count += x.numel() // x.shape[dim]
        a = x.abs().flatten()
        idx = torch.floor((torch.log2(a.clamp(min=2.0**LOG2_MIN)) - LOG2_MIN) * self.bins_per_octave)
        idx = (idx + 1).clamp(0, self.num_bins - 1).to(torch.int64)
        idx[a < 2.0**LOG2_MIN] = 0
        self.hist += torch.bincount(idx, minlength=self.num_bins).to(torch.float64)
        self.batches += 1

    def state(self) -> dict[str, torch.Tensor]:
        """The statistics as tensors (saved in the calibration artifact)."""
        if self.ema_min is None:
            raise RuntimeError("observer saw no data")
        return {
            "ema_min": self.ema_min.reshape(1).cpu(),
            "ema_max": self.ema_max.reshape(1).cpu(),
            "min": self.min.reshape(1).cpu(),
            "max": self.max.reshape(1).cpu(),
            "channel_absmax": self.channel_absmax.cpu(),
            "channel_sqmean": (self.channel_sqsum / max(self.channel_count, 1)).to("cpu", torch.float32),
            "abs_hist": self.hist.to("cpu", torch.float32),
        }

    @staticmethod
    def abs_percentile(hist: torch.Tensor, q: float, bins_per_octave: int) -> float:
        """Upper edge of the bin holding the ``q`` quantile (0-1) of ``|x|`` from a saved ``abs_hist``."""
        cdf = torch.cumsum(hist.to(torch.float64), 0)
        k = int(torch.searchsorted(cdf, q * cdf[-1]).item())
        if k == 0:
            return 2.0**LOG2_MIN
        return 2.0 ** (LOG2_MIN + k / bins_per_octave)


@register("prefix")
class PrefixObserver:
    """Per-token-position statistics of a text-embedding input ``[B, T, D]`` (MixDQ's BOS analysis).

    Records the absmax at every token position (so the BOS outlier is visible), checks that the first token's
    row is identical for every prompt (a causal text encoder's BOS output is; it is verified, not assumed), and
    keeps :class:`ActivationObserver` statistics of the remaining tokens ``1:`` for a scale without the outlier.
    """

    def __init__(self, momentum: float = 0.95, bins_per_octave: int = 8):
        self.rest = ActivationObserver(channel_dim=-1, momentum=momentum, bins_per_octave=bins_per_octave)
        self.token_absmax: torch.Tensor | None = None
        self.prefix_ref: torch.Tensor | None = None
        self.prefix_max_dev = torch.tensor(0.0)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch ``[B, T, D]`` in (other ranks are ignored: not a text embedding)."""
        if x.dim() != 3 or x.shape[1] < 2:
            return
        x = x.detach().to(torch.float32)
        tok = x.abs().amax(dim=(0, 2))
        if self.token_absmax is None:
            self.token_absmax = tok
        else:
            n = max(len(tok), len(self.token_absmax))
            a = torch.nn.functional.pad(self.token_absmax, (0, n - len(self.token_absmax)))
            b = torch.nn.functional.pad(tok, (0, n - len(tok)))
            self.token_absmax = torch.maximum(a, b)
        if self.prefix_ref is None:
            self.prefix_ref = x[0, :1].clone()
            self.prefix_max_dev = self.prefix_max_dev.to(x.device)
        self.prefix_max_dev = torch.maximum(self.prefix_max_dev, (x[:, 0] - self.prefix_ref[0]).abs().amax())
        self.rest.update(x[:, 1:])

    def state(self) -> dict[str, torch.Tensor]:
        """``token_absmax``, ``prefix_ref`` ``[1, D]``, ``prefix_max_dev`` and ``rest_*`` statistics."""
        if self.token_absmax is None:
            return {}
        out = {"token_absmax": self.token_absmax.cpu(), "prefix_ref": self.prefix_ref.cpu(),
               "prefix_max_dev": self.prefix_max_dev.reshape(1).cpu()}
        out.update({f"rest_{k}": v for k, v in self.rest.state().items()})
        return out
