"""Judges of the reference pipeline: attribute accuracy (the CLIP-score analogue) and a Frechet distance in
judge features (the FID analogue).

One small CNN, trained on real coloured digits of the training split, reads a 32x32 RGB image and predicts
its digit, colour and position from a shared 64-dimensional penultimate feature vector; those features
define the Frechet distance. The judge is stored as ``judge.safetensors`` plus ``judge.json`` (architecture,
class names, validation accuracy) and is loaded without pickle.

Images may be given as a ``torch.Tensor`` ``[N, 3, H, W]`` in [0, 1] (``output_type="pt"``), a numpy array
``[N, H, W, 3]`` in [0, 1] (``output_type="np"``) or ``[N, 3, H, W]``, or a list of PIL images; anything not
32x32 is resized.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantkit.reference.data import ATTRIBUTES, IMAGE_SIZE, Prompt, as_prompts, attribute_classes
from quantkit.stats import bootstrap_indices, frechet_distance_from_features, interval95

__all__ = [
    "DEFAULT_JUDGE_DIR",
    "JUDGE_CONFIG",
    "Judge",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_features",
    "judge_accuracy",
    "judge_correct",
    "load_judge",
    "paired_comparison",
    "predict",
    "save_judge",
    "to_judge_input",
]

DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent / "assets" / "judges"

JUDGE_CONFIG = dict(channels=(32, 32, 64), feature_dim=64, image_size=IMAGE_SIZE)


class Judge(nn.Module):
    """Conv-BatchNorm-ReLU trunk (stride-2 stem, then conv + pool) -> ``feature_dim`` penultimate features -> one
    linear head per attribute."""

    def __init__(self, channels: Sequence[int] = (32, 32, 64), feature_dim: int = 64, image_size: int = IMAGE_SIZE,
                 classes: dict[str, Sequence[str]] | None = None):
        super().__init__()
        classes = classes or attribute_classes()
        self.classes = {k: tuple(v) for k, v in classes.items()}
        self.config = {"channels": [int(c) for c in channels], "feature_dim": int(feature_dim),
                       "image_size": int(image_size)}
        # Stride-2 stem (32 -> 16), conv + max-pool per further width (16 -> 8 -> 4), one more conv at 4x4.
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 4, stride=2, padding=1), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU()]
        c_in = channels[0]
        for c in channels[1:]:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.BatchNorm2d(c_in), nn.ReLU()]  # wider receptive field
        self.trunk = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.fc = nn.Linear(c_in * side * side, feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.classes.items()})
        self.dropout = nn.Dropout(0.2)  # training only; no parameters

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1]."""
        h = self.trunk(x * 2.0 - 1.0)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.dropout(self.features(x))
        return {k: head(f) for k, head in self.heads.items()}


def save_judge(judge: Judge, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``judge.safetensors`` and ``judge.json`` to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in judge.state_dict().items()}
    save_file(state, str(folder / "judge.safetensors"), metadata={"format": "pt"})
    config = {
        "architecture": "quantkit.reference.judges.Judge",
        **judge.config,
        "classes": {k: list(v) for k, v in judge.classes.items()},
        **(extra or {}),
    }
    (folder / "judge.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


@lru_cache(maxsize=4)
def _load_cached(folder: str) -> Judge:
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "judge.json").read_text())
    judge = Judge(config["channels"], config["feature_dim"], config["image_size"], config["classes"])
    judge.load_state_dict(load_file(str(Path(folder) / "judge.safetensors")))
    judge.eval()
    for p in judge.parameters():
        p.requires_grad_(False)
    return judge


def load_judge(folder: str | Path | None = None) -> Judge:
    """Load the judge from ``judge.safetensors`` + ``judge.json`` (default: the committed assets). Cached."""
    return _load_cached(str(Path(folder or DEFAULT_JUDGE_DIR).resolve()))


def to_judge_input(images) -> torch.Tensor:
    """Images (tensor / numpy / PIL list, values in [0, 1]) -> float32 ``[N, 3, 32, 32]`` tensor."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
        if hasattr(images[0], "convert"):  # PIL
            arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
            x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        else:
            x = torch.stack([torch.as_tensor(np.asarray(im)) for im in images])
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        x = images
    else:
        raise TypeError(f"unsupported image container {type(images).__name__}")
    x = x.detach().to(torch.float32).cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3-channel images, got shape {tuple(x.shape)}")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).contiguous()


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch_size: int = 512):
    outs = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not outs:
        return None
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def predict(images, judge: Judge | None = None) -> dict[str, np.ndarray]:
    """Predicted label index per attribute, ``{attribute: int array [N]}``."""
    judge = judge or load_judge()
    logits = _batched(judge, to_judge_input(images))
    return {k: v.argmax(1).numpy() for k, v in logits.items()}


def judge_correct(images, prompts: Sequence[Prompt | str | dict], judge: Judge | None = None) -> dict[str, np.ndarray]:
    """Per image, whether the judged attribute matches the prompt: ``{attribute: bool array [N]}``.

    Keys ``"digit"``, ``"colour"``, ``"position"`` and ``"all"`` (every attribute right). The per-image outcomes
    are what a paired comparison of two variants on the same prompts and seeds needs.
    """
    ps = as_prompts(prompts)
    x = to_judge_input(images)
    if len(ps) != len(x):
        raise ValueError(f"{len(x)} images but {len(ps)} prompts")
    pred = predict(x, judge)
    correct = {a: pred[a] == np.array([p.labels[a] for p in ps]) for a in ATTRIBUTES}
    correct["all"] = np.logical_and.reduce([correct[a] for a in ATTRIBUTES])
    return correct


def judge_accuracy(images, prompts: Sequence[Prompt | str | dict], judge: Judge | None = None) -> dict[str, float]:
    """Fraction of images whose judged attribute matches the prompt, per attribute.

    Returns ``{"digit", "colour", "position", "all"}``; ``"all"`` counts images with every attribute right.
    """
    return {a: float(c.mean()) for a, c in judge_correct(images, prompts, judge).items()}


def paired_comparison(correct_a: dict[str, np.ndarray], correct_b: dict[str, np.ndarray], feats_a: np.ndarray,
                      feats_b: np.ndarray, real_feats: np.ndarray, *, attributes: Sequence[str] = ATTRIBUTES,
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """Variant A vs variant B judged on the same prompts and seeds (image ``i`` of A pairs with image ``i`` of B).

    Alignment, per attribute (``judge_correct`` outcomes): the accuracy difference A - B, the discordant images
    (``a_only``: right under A only; ``b_only``), an exact two-sided McNemar p-value (binomial test on the
    discordant images) and a 95 % paired bootstrap interval. Quality: the Frechet difference A - B (to the same
    real features) with a 95 % paired bootstrap interval: each resample draws the same image indices for A and B.
    """
    from scipy.stats import binomtest

    n = len(feats_a)
    if len(feats_b) != n or any(len(c[a]) != n for c in (correct_a, correct_b) for a in attributes):
        raise ValueError("paired comparison needs the same number of images for A and B")
    idx = bootstrap_indices(n, n_boot, seed)

    out: dict = {"images": n}
    for attr in attributes:
        ca, cb = np.asarray(correct_a[attr], bool), np.asarray(correct_b[attr], bool)
        a_only, b_only = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
        p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
        out[attr] = {"diff": float(ca.mean() - cb.mean()), "a_only": a_only, "b_only": b_only,
                     "p_value": float(p), "ci95": interval95(ca[idx].mean(1) - cb[idx].mean(1))}
    fa, fb = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    boot = [frechet_distance_from_features(fa[i], real_feats) - frechet_distance_from_features(fb[i], real_feats)
            for i in idx]
    out["frechet"] = {"diff": frechet_distance_from_features(fa, real_feats)
                      - frechet_distance_from_features(fb, real_feats), "ci95": interval95(boot)}
    return out


def extract_features(images, judge: Judge | None = None) -> np.ndarray:
    """Penultimate judge features ``[N, feature_dim]`` (float64)."""
    judge = judge or load_judge()
    return _batched(judge.features, to_judge_input(images)).double().numpy()


def frechet_distance(images_a, images_b, judge: Judge | None = None) -> float:
    """Frechet distance between two image sets in judge features (the FID analogue; lower is better)."""
    judge = judge or load_judge()
    return frechet_distance_from_features(extract_features(images_a, judge), extract_features(images_b, judge))
