"""Build of the optional native kernels only (``quantkit._C``); all metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch already
installed (build isolation would fetch a second torch). ``QUANTKIT_BUILD_EXT=0`` skips the extension. A missing
compiler or a failed build never fails the install: quantkit then runs its reference ops, and
``quantkit.ops.native_status()`` says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = [
    "csrc/registration.cpp",
    "csrc/cpu/ops.cpp",
    "csrc/cpu/repack.cpp",
    "csrc/cpu/kernels_scalar.cpp",
    "csrc/cpu/kernels_avx2.cpp",  # AVX2+FMA via a target pragma; chosen at run time only on CPUs that have it
]


def _warn(msg: str) -> None:
    warnings.warn(f"quantkit: {msg}; the reference (pure PyTorch) ops will be used", stacklevel=2)
    print(f"WARNING: quantkit: {msg}; the reference (pure PyTorch) ops will be used", file=sys.stderr)


def _compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler compiles and links a trivial program with ``flag``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [*cxx.split(), flag, src, "-o", os.path.join(tmp, "probe")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _extensions():
    if os.environ.get("QUANTKIT_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing or broken at build time
        _warn(f"cannot import torch.utils.cpp_extension ({exc}), skipping the native kernels")
        return [], {}

    class SafeBuildExtension(BuildExtension):
        """BuildExtension that turns a failed native build into a warning instead of a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, compile or link error
                _warn(f"building quantkit._C failed ({exc})")
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas"]
    link_flags = []
    if sys.platform != "win32" and _compiler_accepts("-fopenmp"):
        # at::parallel_for is a header template: without -fopenmp it silently runs on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    ext = CppExtension(
        "quantkit._C",
        CPU_SOURCES,
        include_dirs=[os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")],
        extra_compile_args=cxx_flags,
        extra_link_args=link_flags,
    )
    # CUDA kernels (csrc/cuda) will be added here behind CUDA_HOME and torch.version.cuda.
    return [ext], {"build_ext": SafeBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
