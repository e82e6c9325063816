"""Where quantkit's native sources are, for the builds made at run time (the CUDA extension's JIT build, the
CUTLASS GEMM library): a source checkout's ``csrc/``, or the copy of ``csrc/cuda`` that ``setup.py`` puts in a
built wheel (``quantkit/_csrc/cuda``), so installed users build the same code."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKOUT", "PACKAGED", "PACKAGED_FOLDERS", "csrc_dir"]

CHECKOUT = Path(__file__).resolve().parents[3] / "csrc"  # src/quantkit/ops -> the repository root
PACKAGED = Path(__file__).resolve().parents[1] / "_csrc"  # site-packages/quantkit/_csrc in an installed wheel
PACKAGED_FOLDERS = ("cuda",)  # the folders of csrc/ a wheel carries (setup.py copies them)


def csrc_dir() -> Path:
    """The checkout's ``csrc`` where there is one, else the wheel's copy (which may be absent: an old wheel)."""
    return CHECKOUT if (CHECKOUT / "cuda").is_dir() else PACKAGED
