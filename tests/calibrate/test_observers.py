import torch

from quantkit.calibrate.observers import ActivationObserver


def test_ema_minmax_and_channel_absmax():
    obs = ActivationObserver(channel_dim=-1, momentum=0.9)
    a = torch.tensor([[-1.0, 2.0], [0.5, -3.0]])
    b = torch.tensor([[-5.0, 1.0], [0.0, 0.0]])
    obs.update(a)
    obs.update(b)
    st = obs.state()
    assert abs(st["ema_min"].item() - (0.9 * -3.0 + 0.1 * -5.0)) < 1e-6
    assert abs(st["ema_max"].item() - (0.9 * 2.0 + 0.1 * 1.0)) < 1e-6
    assert st["min"].item() == -5.0 and st["max"].item() == 2.0
    assert torch.equal(st["channel_absmax"], torch.tensor([5.0, 3.0]))


def test_histogram_percentile_within_one_bin():
    obs = ActivationObserver(channel_dim=1, bins_per_octave=8)
    x = torch.randn(4, 8, 64, 64)
    obs.update(x)
    hist = obs.state()["abs_hist"]
    assert hist.sum().item() == x.numel()
    for q in (0.5, 0.99, 0.999):
        est = ActivationObserver.abs_percentile(hist, q, 8)
        true = torch.quantile(x.abs().flatten()[:1_000_000], q).item()
        assert true <= est * 1.0001 and est <= true * 2 ** (1 / 8) * 1.01
