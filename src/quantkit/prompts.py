"""Calibration / evaluation prompts: a built-in list or a text file (one prompt a line)."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError

__all__ = ["BUILTIN_PROMPTS", "load_prompts"]

# Short, varied captions in the style of COCO (MixDQ calibrates on COCO captions).
BUILTIN_PROMPTS = (
    "a photo of an astronaut riding a horse",
    "a red car parked on a city street",
    "a bowl of fruit on a wooden table",
    "a cat sleeping on a blue sofa",
    "a mountain lake at sunrise",
    "two dogs playing in the snow",
    "a plate of pasta with tomato sauce",
    "a lighthouse on a rocky coast at night",
    "a child flying a kite in a park",
    "a vintage bicycle leaning against a brick wall",
    "a bowl of soup next to a loaf of bread",
    "a train crossing a bridge over a river",
    "a street market with colorful umbrellas",
    "a close-up of a sunflower in a field",
    "a man surfing a large wave",
    "a living room with a fireplace and bookshelves",
)


def load_prompts(source: str, n: int) -> list[str]:
    """``n`` prompts from ``source`` (cycled if shorter).

    Args:
        source: ``builtin`` (COCO-style captions), ``builtin:digits`` (the reference model's checkable prompts),
            or a text file with one prompt a line.

    Raises:
        QuantkitError: the file is missing or holds no prompt.
    """
    if source == "builtin":
        return [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(n)]
    if source == "builtin:digits":
        try:
            from quantkit.reference import default_prompts
        except ImportError:
            raise QuantkitError("builtin:digits prompts need the reference model, not part of this installation; "
                                "use 'builtin' or a prompts file") from None

        return [p.text for p in default_prompts(n)]
    path = Path(source)
    if not path.is_file():
        raise QuantkitError(f"prompts file not found: {path} (use 'builtin' or a text file, one prompt a line)")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise QuantkitError(f"prompts file {path} holds no prompt")
    return [lines[i % len(lines)] for i in range(n)]
