"""Where the run-time builds find quantkit's native sources: the checkout's csrc/, else the copy a wheel carries."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from quantkit.ops import cuda, cutlass_gemm, sources

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = (".cu", ".cpp", ".h", ".hpp", ".cuh")


def _cuda_sources() -> dict[str, bytes]:
    """``{path relative to csrc/: bytes}`` of every source a wheel must carry."""
    out = {}
    for folder in sources.PACKAGED_FOLDERS:
        for f in sorted((ROOT / "csrc" / folder).rglob("*")):
            if f.suffix in SUFFIXES:
                out[f.relative_to(ROOT / "csrc").as_posix()] = f.read_bytes()
    return out


def test_checkout_sources_are_used_in_a_checkout():
    assert sources.csrc_dir() == ROOT / "csrc"
    assert all(f.is_file() and f.parent == ROOT / "csrc" / "cuda" / "cutlass" for f in cutlass_gemm.SOURCES)
    assert cuda._CSRC == ROOT / "csrc" / "cuda"


def test_falls_back_to_the_packaged_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "CHECKOUT", tmp_path / "no-checkout" / "csrc")
    assert sources.csrc_dir() == sources.PACKAGED
    assert sources.PACKAGED == Path(sources.__file__).resolve().parents[1] / "_csrc"


@pytest.mark.slow
def test_wheel_carries_the_cuda_sources_and_uses_them(tmp_path):
    """A built wheel holds csrc/cuda byte for byte under quantkit/_csrc, and an install of it builds from there."""
    env = {**os.environ, "QUANTKIT_BUILD_EXT": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist")], check=True, env=env, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("quantkit-*.whl")
    expected = _cuda_sources()
    assert any(k.endswith("w8a8_sm90.cu") for k in expected) and any(k.endswith("quant_gemm.hpp") for k in expected)
    with zipfile.ZipFile(wheel) as z:
        packed = {n[len("quantkit/_csrc/"):]: z.read(n) for n in z.namelist() if n.startswith("quantkit/_csrc/")}
        z.extractall(tmp_path / "site")
    assert packed == expected
    # the installed package (no checkout above it) resolves its sources to the packaged copy
    probe = ("import quantkit.ops.cutlass_gemm as c, quantkit.ops.cuda as d; "
             "print(c.SOURCES[0]); print(all(f.is_file() for f in c.SOURCES)); print(d._CSRC)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path).stdout.split()
    site = (tmp_path / "site" / "quantkit" / "_csrc").resolve()
    assert out == [str(site / "cuda" / "cutlass" / "w8a8_sm90.cu"), "True", str(site / "cuda")]
