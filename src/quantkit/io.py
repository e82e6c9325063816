"""File helpers shared by every stage: atomic output folders and safe safetensors/JSON reading."""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from quantkit.errors import QuantkitError

__all__ = ["atomic_output", "load_safetensors", "check_safetensors", "read_json", "write_json"]


@contextmanager
def atomic_output(final: str | Path, overwrite: bool = True):
    """Yield a temporary sibling folder of ``final``; on success it replaces ``final``, on error it is removed.

    Raises:
        QuantkitError: ``final`` exists and ``overwrite`` is False.
    """
    final = Path(final)
    check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def check_output_free(final: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``: call it before long work, not only at the end."""
    if Path(final).exists() and not overwrite:
        raise QuantkitError(f"output folder {final} already exists; pass --overwrite or choose another --out")


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON through a temporary sibling file, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def check_safetensors(path: str | Path) -> None:
    """Validate a safetensors file's header and size without reading its data.

    Raises:
        QuantkitError: the file is missing, its header is corrupted, or it is shorter than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"missing file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys[:1]:
                f.get_slice(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise QuantkitError(f"{path}: corrupted or truncated safetensors file ({str(exc).splitlines()[0]}); "
                            "re-export or re-download it") from None


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file (never pickle), with a one-line error on corruption."""
    path = Path(path)
    check_safetensors(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise QuantkitError(f"{path}: corrupted or truncated safetensors file ({exc}); re-create it") from None


def read_json(path: str | Path) -> dict:
    """Read a JSON file, with a one-line error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
