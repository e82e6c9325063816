"""Naive uniform quantization of the reference digits model: alignment, quality and fidelity per bit budget.

    PYTHONPATH=src python benchmarks/reference_quant.py [--num-images 400] [--calib-prompts 32] [--out DIR]

Every scheme quantizes all Conv2d/Linear layers of the UNet the same way through quantkit's own stages
(``quantkit.stages.export``: round-to-nearest, per-channel symmetric weights, static per-tensor activation
ranges from one shared calibration on the digits prompts, ``bos_aware`` off so the scheme stays uniform), then
``quantkit.evaluate.evaluate`` generates every pipeline on the same prompts and seeds and measures alignment
(judge accuracy per attribute), quality (Frechet distance in judge features, with the real-vs-real floor) and
fidelity (PSNR/SSIM against the FP images). Writes ``benchmarks/results/reference_quant.json`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["SCHEMES", "main", "scheme_config"]

ROOT = Path(__file__).resolve().parent
# (label, weight bits, activation bits); activation None = weight-only.
SCHEMES: tuple[tuple[str, int, int | None], ...] = (
    ("W8A8", 8, 8),
    ("W8A7", 8, 7),  # the CPU kernels' fast 8-bit-weight path (vpmaddubsw), one activation bit less
    ("W4A8", 4, 8),
    ("W4A4", 4, 4),
    ("W3A8", 3, 8),
    ("W2A8", 2, 8),
    ("W8A4", 8, 4),
    ("W8A3", 8, 3),
)


def scheme_config(w_bits: int, a_bits: int | None, calib_prompts: int, steps: int, guidance: float):
    """The quantkit config of one uniform scheme on ``builtin:digits``."""
    from quantkit.config import parse_config

    return parse_config({
        "schema_version": 1,
        "model": "builtin:digits",
        "quantization": {
            "targets": ["re:.*"],
            "weights": {"bits": w_bits, "symmetric": True, "group_size": -1},
            "activations": None if a_bits is None else {"bits": a_bits, "dynamic": False},
            "bos_aware": False,
        },
        "calibration": {"prompts": "builtin:digits", "num_prompts": calib_prompts, "num_inference_steps": steps,
                        "guidance_scale": guidance, "seed": 0, "batch_size": 16},
    }, source=f"W{w_bits}A{a_bits}")


def _table(results: dict) -> str:
    floor = results["frechet_real_vs_real"]
    head = ("| scheme | acc digit | acc colour | acc position | acc all | Frechet | Frechet / floor "
            "| PSNR vs FP (dB) | SSIM vs FP |")
    lines = [head, "|" + "---|" * 9]
    for name, e in results["pipelines"].items():
        acc = e["alignment"]
        psnr = f"{e['psnr_db']:.2f}" if "psnr_db" in e else "-"
        ssim = f"{e['ssim']:.4f}" if "ssim" in e else "-"
        lines.append(f"| {name} | {acc['digit']:.3f} | {acc['colour']:.3f} | {acc['position']:.3f} "
                     f"| {acc['all']:.3f} | {e['frechet']:.2f} | {e['frechet'] / floor:.2f} | {psnr} | {ssim} |")
    lines.append(f"\nReal-vs-real Frechet floor ({results['num_images']} images): {floor:.2f}; "
                 f"{results['steps']} steps, guidance {results['guidance_scale']}, seed {results['seed']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=400, help="images per pipeline (default %(default)s)")
    parser.add_argument("--calib-prompts", type=int, default=32, help="calibration prompts (default %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("quantkit-work/reference_quant"),
                        help="exports and calibration (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "reference_quant.json")
    parser.add_argument("--schemes", default=None,
                        help="comma-separated labels to run (default: all of %s)" % ",".join(s[0] for s in SCHEMES))
    args = parser.parse_args(argv)

    import torch

    from quantkit import stages
    from quantkit.evaluate import evaluate
    from quantkit.reference import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    exports, labels = [], []
    wanted = None if args.schemes is None else set(args.schemes.split(","))
    if wanted is not None and not wanted <= {s[0] for s in SCHEMES}:
        parser.error(f"unknown scheme in --schemes: {sorted(wanted - {s[0] for s in SCHEMES})}")
    schemes = [s for s in SCHEMES if wanted is None or s[0] in wanted]
    for label, w, a in schemes:
        config = scheme_config(w, a, args.calib_prompts, DEFAULT_NUM_STEPS, DEFAULT_GUIDANCE_SCALE)
        out = args.work / label
        stages.export(config, out, args.work, overwrite=True)  # one calibration in args.work, reused
        exports.append(str(out))
        labels.append(label)
    t_export = time.perf_counter() - t0
    results = evaluate("builtin:digits", exports, args.work / "eval", num_images=args.num_images, labels=labels,
                       steps=DEFAULT_NUM_STEPS, guidance_scale=DEFAULT_GUIDANCE_SCALE, overwrite=True)
    results["schemes"] = {label: {"weight_bits": w, "act_bits": a} for label, w, a in schemes}
    results["calibration_prompts"] = args.calib_prompts
    results["seconds_export"] = round(t_export, 1)
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    results["machine_note"] = "2-core CPU shared with other jobs; one torch thread; timings are inflated"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))
    print(f"\nwritten {args.out} ({results['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
