"""Inner-loop ceilings of the CPU micro-kernels: how fast each instruction mix can go on this machine.

Builds benchmarks/native/cpu_peak.c with gcc and runs it: the register-blocked inner loops of an fp32 FMA GEMM
(what MKL / oneDNN run), of quantkit's exact W8A8 kernel (int16-widened codes, vpmaddwd), of its W4A8 kernel
(vpmaddubsw on nibbles) and of fbgemm's reduce-range scheme (vpmaddubsw on 7-bit activations), over L1-resident
data, one thread, best of 15 interleaved rounds. The ratios to fp32 are upper bounds for the speed-up any kernel
built on that instruction mix can reach on compute-bound shapes (no memory traffic, packing or epilogue counted).

    python benchmarks/cpu_peak.py        # writes benchmarks/results/cpu_peak.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    if platform.machine() not in ("x86_64", "AMD64"):
        print("cpu_peak: x86-64 only", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "cpu_peak"
        subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", str(ROOT / "benchmarks" / "native" / "cpu_peak.c"), "-o",
                        str(exe)], check=True)
        res = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    fp32 = res["fp32_gmacs"]
    res["ratio_to_fp32"] = {k.removesuffix("_gmacs"): round(v / fp32, 3) for k, v in res.items() if k != "fp32_gmacs"}
    res["cpu"] = cpu_model()
    out = ROOT / "benchmarks" / "results" / "cpu_peak.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
