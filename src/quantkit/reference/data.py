"""Coloured, positioned handwritten digits and the prompt grammar that describes them.

Every image is a 32x32 RGB canvas (black background) holding one scikit-learn 8x8 digit, upsampled to
16x16, tinted with one of :data:`COLOURS` and placed in one of :data:`POSITIONS` (with a +-1 pixel jitter).
Its prompt names all three attributes::

    "a <colour> handwritten digit <digit word> on the <position>"
    e.g. "a red handwritten digit seven on the left"

so the digit, the colour and the position of a generated image can each be checked by a judge.

The 1797 scikit-learn digits are split once, deterministically, into a training part (used to train the
VAE, the UNet and the judges) and a held-out part (used only for the real-vs-real Frechet noise floor and
judge validation). Everything here is a pure function of its arguments and seeds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "COLOUR_RGB",
    "DIGIT_WORDS",
    "GLYPH_SIZE",
    "IMAGE_SIZE",
    "JITTER",
    "POSITIONS",
    "POSITION_ORIGIN",
    "PROMPT_WORDS",
    "HELDOUT_FRACTION",
    "SPLIT_SEED",
    "Prompt",
    "attribute_classes",
    "default_prompts",
    "digit_split",
    "format_prompt",
    "load_glyphs",
    "parse_prompt",
    "read_prompts_file",
    "real_images",
    "render",
    "write_prompts_file",
]

IMAGE_SIZE = 32
GLYPH_SIZE = 16
JITTER = 1
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
# Top-left corner (row, col) of the 16x16 glyph box before jitter.
POSITION_ORIGIN: dict[str, tuple[int, int]] = {
    "left": (8, 1),
    "right": (8, 15),
    "top": (1, 8),
    "bottom": (15, 8),
}
ATTRIBUTES: tuple[str, ...] = ("digit", "colour", "position")
PROMPT_WORDS: tuple[str, ...] = ("a", "handwritten", "digit", "on", "the") + DIGIT_WORDS + COLOURS + POSITIONS
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 1234

_PROMPT_RE = re.compile(r"^\s*a\s+(\w+)\s+handwritten\s+digit\s+(\w+)\s+on\s+the\s+(\w+)\s*$", re.IGNORECASE)


def attribute_classes() -> dict[str, tuple[str, ...]]:
    """Class names of every checkable attribute, in label-index order."""
    return {"digit": DIGIT_WORDS, "colour": COLOURS, "position": POSITIONS}


@dataclass(frozen=True)
class Prompt:
    """A checkable prompt: its text and the integer label of every attribute."""

    digit: int
    colour: int
    position: int

    @property
    def text(self) -> str:
        return format_prompt(self.digit, self.colour, self.position)

    @property
    def labels(self) -> dict[str, int]:
        return {"digit": self.digit, "colour": self.colour, "position": self.position}

    @property
    def names(self) -> dict[str, str]:
        return {"digit": DIGIT_WORDS[self.digit], "colour": COLOURS[self.colour], "position": POSITIONS[self.position]}

    def to_dict(self) -> dict:
        return {"text": self.text, **asdict(self)}

    def __str__(self) -> str:
        return self.text


def format_prompt(digit: int, colour: int, position: int) -> str:
    """``"a <colour> handwritten digit <digit word> on the <position>"`` from label indices."""
    return f"a {COLOURS[colour]} handwritten digit {DIGIT_WORDS[digit]} on the {POSITIONS[position]}"


def parse_prompt(text: str) -> Prompt:
    """Inverse of :func:`format_prompt`; raises ``ValueError`` for text outside the grammar."""
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(f"prompt {text!r} is not of the form 'a <colour> handwritten digit <digit> on the <position>'")
    colour, digit, position = (g.lower() for g in m.groups())
    try:
        return Prompt(DIGIT_WORDS.index(digit), COLOURS.index(colour), POSITIONS.index(position))
    except ValueError as exc:
        raise ValueError(f"prompt {text!r} uses a word outside the grammar") from exc


def as_prompts(prompts: Iterable[Prompt | str | dict]) -> list[Prompt]:
    """Normalise prompts given as :class:`Prompt`, text, or dicts with the attribute labels."""
    out = []
    for p in prompts:
        if isinstance(p, Prompt):
            out.append(p)
        elif isinstance(p, str):
            out.append(parse_prompt(p))
        elif isinstance(p, dict):
            if all(a in p for a in ATTRIBUTES):
                out.append(Prompt(int(p["digit"]), int(p["colour"]), int(p["position"])))
            else:
                out.append(parse_prompt(p["text"]))
        else:
            raise TypeError(f"cannot interpret {type(p).__name__} as a prompt")
    return out


def default_prompts(n: int = 40, seed: int = 0) -> list[Prompt]:
    """``n`` checkable prompts, balanced over every attribute and shuffled by ``seed``.

    Every consecutive block of 40 holds each digit 4 times and each colour and position 10 times; the
    first 160 are the 160 digit x colour x position combinations, each once.
    """
    rng = np.random.default_rng(seed)
    n_c, n_p = len(COLOURS), len(POSITIONS)
    out: list[Prompt] = []
    while len(out) < n:
        # Four blocks of 40 cover all 160 combinations once; within a block every digit appears 4 times
        # and every colour and position 10 times (position = (colour + digit + block) mod 4).
        for b in rng.permutation(n_p):
            block = [Prompt(d, c, int((c + d + b) % n_p)) for d in range(10) for c in range(n_c)]
            out.extend(block[i] for i in rng.permutation(len(block)))
    return out[:n]


def write_prompts_file(path: str | Path, prompts: Iterable[Prompt | str | dict]) -> Path:
    """Write one prompt text per line (labels are recovered by :func:`parse_prompt`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.text + "\n" for p in as_prompts(prompts)))
    return path


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """Read a file written by :func:`write_prompts_file` (blank lines and ``#`` comments are skipped)."""
    lines = Path(path).read_text().splitlines()
    return [parse_prompt(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


@lru_cache(maxsize=1)
def load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits upsampled to ``GLYPH_SIZE`` (float32 in [0, 1]) and their labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(GLYPH_SIZE, GLYPH_SIZE), mode="bilinear", align_corners=False)
    return big[:, 0].clamp(0, 1).numpy(), digits.target.astype(np.int64)


@lru_cache(maxsize=1)
def digit_split() -> dict[str, np.ndarray]:
    """Deterministic stratified split of glyph indices into ``{"train", "heldout"}``."""
    _, labels = load_glyphs()
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * HELDOUT_FRACTION))
        held.append(idx[:k])
        train.append(idx[k:])
    return {"train": np.sort(np.concatenate(train)), "heldout": np.sort(np.concatenate(held))}


def render(glyphs: np.ndarray, colours: np.ndarray, positions: np.ndarray,
           shifts: np.ndarray | None = None) -> np.ndarray:
    """Render glyphs ``[N, 16, 16]`` onto black ``[N, 3, 32, 32]`` canvases in [0, 1].

    Args:
        glyphs: intensities in [0, 1].
        colours, positions: label indices ``[N]``.
        shifts: integer ``[N, 2]`` (row, col) jitter in ``[-JITTER, JITTER]``; zeros if omitted.
    """
    n = len(glyphs)
    out = np.zeros((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    if shifts is None:
        shifts = np.zeros((n, 2), dtype=np.int64)
    rgb = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float32)
    for i in range(n):
        r0, c0 = POSITION_ORIGIN[POSITIONS[int(positions[i])]]
        r0 += int(shifts[i, 0])
        c0 += int(shifts[i, 1])
        out[i, :, r0 : r0 + GLYPH_SIZE, c0 : c0 + GLYPH_SIZE] = rgb[int(colours[i])][:, None, None] * glyphs[i][None]
    return out


def _pick_glyphs(digits: np.ndarray, split: str, rng: np.random.Generator) -> np.ndarray:
    glyphs, labels = load_glyphs()
    pool = digit_split()[split]
    chosen = np.empty(len(digits), dtype=np.int64)
    for d in range(10):
        where = np.flatnonzero(digits == d)
        if len(where) == 0:
            continue
        cands = pool[labels[pool] == d]
        # Sample without replacement while possible so small sets hold distinct writers.
        reps = int(np.ceil(len(where) / len(cands)))
        order = np.concatenate([rng.permutation(cands) for _ in range(reps)])
        chosen[where] = order[: len(where)]
    return glyphs[chosen]


def real_images(prompts: Sequence[Prompt | str | dict], split: str = "heldout", seed: int = 0) -> np.ndarray:
    """Real images matching ``prompts``: ``[N, 3, 32, 32]`` float32 in [0, 1].

    Glyphs of the requested digit are drawn from ``split`` (``"train"`` or ``"heldout"``), with a random
    jitter; use them as the reference set of the Frechet distance.
    """
    ps = as_prompts(prompts)
    rng = np.random.default_rng(seed)
    digits = np.array([p.digit for p in ps], dtype=np.int64)
    colours = np.array([p.colour for p in ps], dtype=np.int64)
    positions = np.array([p.position for p in ps], dtype=np.int64)
    glyphs = _pick_glyphs(digits, split, rng)
    shifts = rng.integers(-JITTER, JITTER + 1, size=(len(ps), 2))
    return render(glyphs, colours, positions, shifts)


def random_training_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images of ``split`` with uniformly random attributes; returns images and labels ``[N, 3]``."""
    glyphs, labels = load_glyphs()
    pool = digit_split()[split]
    idx = pool[rng.integers(0, len(pool), size=n)]
    colours = rng.integers(0, len(COLOURS), size=n)
    positions = rng.integers(0, len(POSITIONS), size=n)
    shifts = rng.integers(-JITTER, JITTER + 1, size=(n, 2))
    images = render(glyphs[idx], colours, positions, shifts)
    return images, np.stack([labels[idx], colours, positions], axis=1)


def prompts_json(prompts: Iterable[Prompt]) -> str:
    """The prompts with their labels as a JSON list (for reports)."""
    return json.dumps([p.to_dict() for p in prompts], indent=1)
