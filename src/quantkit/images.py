"""Image grids: what a person looks at to compare FP and quantized pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["save_grid", "to_uint8"]


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` float in ``[0, 1]`` -> uint8."""
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_grid(rows: list[np.ndarray], labels: list[str], path: str | Path, min_cell: int = 96) -> Path:
    """Save a labelled grid, one row per image set (``[N, H, W, C]`` floats in ``[0, 1]``), small images upscaled."""
    n, h, w = rows[0].shape[:3]
    scale = max(1, min_cell // max(h, w))
    ch, cw = h * scale, w * scale
    label_w = 8 + 7 * max(len(s) for s in labels)
    grid = Image.new("RGB", (label_w + n * (cw + 2), len(rows) * (ch + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (imgs, label) in enumerate(zip(rows, labels)):
        y = r * (ch + 2)
        draw.text((4, y + ch // 2 - 5), label, fill="black")
        for i in range(n):
            tile = Image.fromarray(to_uint8(imgs[i])).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (label_w + i * (cw + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
