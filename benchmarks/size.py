"""Exported size of a full-size denoiser (random weights) vs its FP16 safetensors.

    python benchmarks/size.py [--arch sd-turbo] [--out benchmarks/results/size.json]

Builds the architecture from its config (no download), writes the FP16 safetensors and the quantkit export of
the same weights at W8 and W4 (per channel) and W4 with groups of 64, and reports file sizes and ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.export.writer import WEIGHTS_NAME, write_quantized_component
from quantkit.formats.spec import LayerScheme, WeightFormat
from quantkit.models.architectures import build_denoiser
from quantkit.models.layers import find_layers
from quantkit.quantize.apply import quantize_denoiser

SCHEMES = {
    "W8 per-channel": {"default": WeightFormat(8)},
    "W4 per-channel": {"default": WeightFormat(4)},
    "W4 group 64 (conv_in per-channel)": {"default": WeightFormat(4, 64), "conv_in": WeightFormat(4)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd-turbo")
    ap.add_argument("--out", default="benchmarks/results/size.json")
    args = ap.parse_args()
    results = {"arch": args.arch, "torch": torch.__version__, "schemes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_denoiser(args.arch).to(torch.float16)
        results["parameters"] = sum(p.numel() for p in model.parameters())
        fp16 = tmp / "fp16.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp16))
        results["fp16_bytes"] = fp16.stat().st_size
        layers = find_layers(model)
        for label, spec in SCHEMES.items():
            t0 = time.perf_counter()
            den = build_denoiser(args.arch).to(torch.float16)  # same seed: the same weights
            plan = {la.fqn: LayerScheme(spec.get(la.fqn, spec["default"])) for la in layers}
            quantize_denoiser(den, plan, None, progress=False)
            folder = tmp / label.replace(" ", "_")
            write_quantized_component(den, plan, folder, float_dtype="float16")
            size = (folder / WEIGHTS_NAME).stat().st_size
            results["schemes"][label] = {"bytes": size, "ratio_vs_fp16": round(size / results["fp16_bytes"], 4),
                                         "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{label:36s} {size / 2**20:9.1f} MiB  ratio {size / results['fp16_bytes']:.4f}", flush=True)
            del den
    print(f"{'FP16':36s} {results['fp16_bytes'] / 2**20:9.1f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
