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
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = [
    "csrc/registration.cpp",
    "csrc/cpu/ops.cpp",
    "csrc/cpu/repack.cpp",
    "csrc/cpu/kernels_scalar.cpp",
    "csrc/cpu/kernels_avx2.cpp",  # AVX2+FMA via a target pragma; chosen at run time only on CPUs that have it
    "csrc/cpu/codebook.cpp",  # JLCM codebook GEMV/GEMM/conv (AVX2 via function target attributes)
]
# Built only against a CUDA torch (TORCH_CUDA_ARCH_LIST picks the targets, e.g. "8.0;9.0"); CI compiles these
# sources with nvcc alone (tests/ops/test_cuda_build.py).
CUDA_SOURCES = ["csrc/cuda/ops_cuda.cpp", "csrc/cuda/kernels.cu"]


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
    exts = [ext]
    cuda = _cuda_extension()
    if cuda is not None:
        exts.append(cuda)
    return exts, {"build_ext": SafeBuildExtension.with_options(use_ninja=False)}


def _cuda_extension():
    """``quantkit._C_cuda`` when torch is a CUDA build and nvcc is found; None (skipped, no warning) otherwise."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("QUANTKIT_BUILD_CUDA", "1") == "0":
        return None
    return CUDAExtension(
        "quantkit._C_cuda",
        CUDA_SOURCES,
        include_dirs=[os.path.join(HERE, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )


class BuildPyWithSources(build_py):
    """Also copies ``csrc/cuda`` into the built package as ``quantkit/_csrc/cuda``: the sources of the builds made
    at run time (the CUTLASS GEMM library, the CUDA extension's JIT build), found by ``quantkit.ops.sources``."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's csrc/ directly
            return
        for folder in ("cuda",):  # quantkit.ops.sources.PACKAGED_FOLDERS
            src = os.path.join(HERE, "csrc", folder)
            for dirpath, _dirs, files in os.walk(src):
                rel = os.path.relpath(dirpath, os.path.join(HERE, "csrc"))
                for name in sorted(files):
                    if name.endswith((".cu", ".cpp", ".h", ".hpp", ".cuh")):
                        dest = os.path.join(self.build_lib, "quantkit", "_csrc", rel)
                        self.mkpath(dest)
                        self.copy_file(os.path.join(dirpath, name), os.path.join(dest, name))


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithSources})
