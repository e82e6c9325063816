"""JLCM measurements: CPU kernel speed and exactness, per-layer output error at equal bits, the update ablation,
calibration (learning) time of the reference UNet, and end-to-end quality on the reference model.

    PYTHONPATH=src python benchmarks/jlcm.py kernels   # -> benchmarks/results/jlcm_kernels.json
    PYTHONPATH=src python benchmarks/jlcm.py layers    # -> benchmarks/results/jlcm_layers.json
    PYTHONPATH=src python benchmarks/jlcm.py e2e       # -> benchmarks/results/jlcm_e2e.json

Kernel ratios are measured side by side (fp32 ``F.linear`` and the codebook op interleaved, medians) because
the machine is shared and noisy; compare ratios, not absolute times, across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"

# Linear shapes (out, in) of the SD 2.1 / SD-Turbo UNet: attention projections at each width, feed-forward in/out.
UNET_LINEAR_SHAPES = [(320, 320), (640, 640), (1280, 1280), (2560, 320), (320, 1280), (5120, 640), (640, 2560),
                      (1280, 5120)]


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


_COLD_BYTES = 96 << 20  # weights cycled per cold pass: three times this machine's 32 MiB L3


def _cold_time(fns, passes: int = 3) -> float:
    """Seconds per call of ``fns`` called in turn, their weights evicted from the caches by the others (the fastest
    of ``passes`` passes, each after a warm-up pass)."""
    best = float("inf")
    for _ in range(passes):
        for fn in fns:
            fn()
        t = time.perf_counter()
        for fn in fns:
            fn()
        best = min(best, (time.perf_counter() - t) / len(fns))
    return best


def bench_kernels(reps: int = 15) -> dict:
    """Codebook linear (native) vs fp32 F.linear at M = 1 and M = 256, per UNet shape and bit width. At M = 1 also
    cold: weight copies cycled past 3x the L3 so every call reads its weights from memory, as a pipeline whose
    weights exceed the caches does (warm = one copy, cache-resident across calls)."""
    import quantkit  # noqa: F401
    from quantkit.ops import native, reference
    from tests.ops.samples import codebook_weight

    status = native.native_status()
    has = torch._C._dispatch_has_kernel_for_dispatch_key("quantkit::gemm_codebook", "CPU")
    rows = []
    for (o, k) in UNET_LINEAR_SHAPES:
        for bits in (2, 3, 4):
            codes, cb, scale, rg = codebook_weight(o, k, bits, 8, False, seed=o + k)
            w = reference.dequantize_codebook(codes, cb, scale, rg, bits, k)
            exact_w = bool(torch.equal(torch.ops.quantkit.dequantize_codebook(codes, cb, scale, rg, bits, k), w))
            for m in (1, 256):
                x = torch.randn(m, k)
                y = torch.ops.quantkit.gemm_codebook(x, codes, cb, scale, rg, None, bits)
                ref = reference.gemm_codebook(x, codes, cb, scale, rg, None, bits)
                err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                r = 5 if m == 256 else reps
                t_fp, t_cb = [], []
                for _ in range(3):  # interleave the two so load changes hit both
                    t_fp.append(_median_time(lambda: F.linear(x, w), r))
                    t_cb.append(_median_time(lambda: torch.ops.quantkit.gemm_codebook(x, codes, cb, scale, rg, None,
                                                                                      bits), r))
                tf, tc = min(t_fp), min(t_cb)
                rows.append({"out": o, "in": k, "bits": bits, "m": m, "fp32_ms": round(tf * 1e3, 4),
                             "codebook_ms": round(tc * 1e3, 4), "speedup_vs_fp32": round(tf / tc, 3),
                             "decoded_weight_exact": exact_w, "output_equal": bool(torch.equal(y, ref)),
                             "max_rel_err_vs_reference": err})
                if m == 1:
                    n_fp = -(-_COLD_BYTES // (o * k * 4))
                    n_cb = min(-(-_COLD_BYTES // (codes.numel() * 4)), 2000)
                    ws = [w.clone() for _ in range(n_fp)]
                    cbs = [codes.clone() for _ in range(n_cb)]
                    tf_c = _cold_time([lambda w_=w_: F.linear(x, w_) for w_ in ws])
                    tc_c = _cold_time([lambda c_=c_: torch.ops.quantkit.gemm_codebook(x, c_, cb, scale, rg, None, bits)
                                       for c_ in cbs])
                    del ws, cbs
                    rows[-1].update({"fp32_cold_ms": round(tf_c * 1e3, 4), "codebook_cold_ms": round(tc_c * 1e3, 4),
                                     "speedup_vs_fp32_cold": round(tf_c / tc_c, 3)})
                print(json.dumps(rows[-1]))
    summary = {}
    for key, m, field in (("m1", 1, "speedup_vs_fp32"), ("m1_cold", 1, "speedup_vs_fp32_cold"),
                          ("m256", 256, "speedup_vs_fp32")):
        sp = [r[field] for r in rows if r["m"] == m]
        summary[key] = {"min_speedup": min(sp), "median_speedup": statistics.median(sp),
                        "geomean_speedup": round(math.exp(sum(math.log(s) for s in sp) / len(sp)), 3)}
    return {"native": {"loaded": status["loaded"], "codebook_kernel": has,
                       "isa": status.get("cpu_features", {}).get("isa")},
            "threads": torch.get_num_threads(), "rows": rows, "summary": summary}


def _reference_calibration(num_prompts: int, steps: int, cache: str | None = None):
    """The reference pipeline, its layers and a calibration artifact (reused from ``cache`` when it is there)."""
    from quantkit.calibrate.artifact import load_artifact, save_artifact
    from quantkit.calibrate.runner import calibrate_pipeline
    from quantkit.config import CalibrationSettings
    from quantkit.models.layers import find_layers
    from quantkit.reference import DEFAULT_GUIDANCE_SCALE, load_reference_pipeline

    pipe = load_reference_pipeline()
    layers = find_layers(pipe.unet)
    settings = CalibrationSettings(prompts="builtin:digits", num_prompts=num_prompts, num_inference_steps=steps,
                                   guidance_scale=DEFAULT_GUIDANCE_SCALE, batch_size=4)
    t = time.perf_counter()
    if cache and (Path(cache) / "manifest.json").is_file():
        art = load_artifact(Path(cache))
        return pipe, layers, art, float(art.manifest.get("seconds", 0.0))
    art = calibrate_pipeline(pipe, settings, layers, "builtin:digits")
    if cache:
        save_artifact(art, Path(cache))
    return pipe, layers, art, time.perf_counter() - t


def _matched_formats(shape, bits: int):
    """(uniform group-wise WeightFormat, CodebookFormat) whose bits per weight are within 0.05, the uniform one
    with the smallest group size (its strongest setting) for which a codebook setting matches."""
    from quantkit.formats.spec import CodebookFormat, WeightFormat, format_bits_per_weight

    o, k = shape[0], math.prod(shape[1:])
    uni = [WeightFormat(bits, g) for g in (16, 32, 64, 128, 256, 512) if k % g == 0 and g < k] + [WeightFormat(bits)]
    cbs = [CodebookFormat(bits, g, s) for g in (1, 2, 4, 8, 16, 32, 64, 128, 256) if g <= o for s in (False, True)]
    for u in uni:
        bu = format_bits_per_weight(u, shape)
        best = min(cbs, key=lambda c: abs(format_bits_per_weight(c, shape) - bu))
        if abs(format_bits_per_weight(best, shape) - bu) <= 0.05:
            return u, best, bu, format_bits_per_weight(best, shape)
    return None


def bench_layers(num_prompts: int = 16, steps: int = 4, iterations: int = 60, cache: str | None = None) -> dict:
    """Per-layer test-split output error: JLCM vs plain k-means vs uniform INT{2,3} g-scales at equal bits, and
    the proximal-vs-STE ablation; plus the JLCM learning time of the whole reference UNet."""
    from quantkit.codebook import LearnSettings, collect_grams, column_weight, fit_codebook, output_error
    from quantkit.formats.pack import dequantize_weight, quantize_weight
    from quantkit.reference import unet_sha256

    pipe, layers, art, t_cal = _reference_calibration(num_prompts, steps, cache)

    def split(i):
        return {3: "val", 4: "test"}.get(i % 5, "train")

    t = time.perf_counter()
    fqns = [la.fqn for la in layers]
    grams = collect_grams(pipe.unet, fqns, art.steps, split=split)
    t_gram = time.perf_counter() - t
    rows = []
    t_learn = {2: 0.0, 3: 0.0}
    for la in layers:
        module = pipe.unet.get_submodule(la.fqn)
        w = module.weight.detach().reshape(la.weight_shape[0], -1).float()
        g = grams[la.fqn]
        h, hv, ht = g.mean("train"), g.mean("val"), g.mean("test")
        colw = column_weight(module, art.stats.get(la.fqn, {}).get("channel_sqmean"))
        row = {"layer": la.fqn, "shape": list(la.weight_shape), "rows": {k: g.rows[k] for k in g.rows}}
        for bits in (3, 2):
            match = _matched_formats(la.weight_shape, bits)
            if match is None:
                row[f"b{bits}"] = None
                continue
            ufmt, cfmt, bu, bc = match
            codes, scale, zp = quantize_weight(w, ufmt)
            e_uni = output_error(dequantize_weight(codes, scale, zp, ufmt), w, ht)
            plain = fit_codebook(w, cfmt, h, hv, None, LearnSettings(iterations=0, weighted_init=False))
            t0 = time.perf_counter()
            prox = fit_codebook(w, cfmt, h, hv, colw, LearnSettings(iterations=iterations))
            t_learn[bits] += time.perf_counter() - t0
            ste = fit_codebook(w, cfmt, h, hv, colw, LearnSettings(iterations=iterations, update="ste"))
            res = {"uniform_format": ufmt.name, "uniform_bpw": round(bu, 4), "codebook_format": cfmt.name,
                   "codebook_bpw": round(bc, 4), "uniform": output_error(dequantize_weight(codes, scale, zp, ufmt), w,
                                                                         ht),
                   "plain_kmeans": output_error(plain.dequantize(), w, ht),
                   "jlcm_init": prox.history["init_val_error"],
                   "jlcm_proximal": output_error(prox.dequantize(), w, ht),
                   "jlcm_ste": output_error(ste.dequantize(), w, ht),
                   "proximal_iterations": prox.history.get("iterations_run"),
                   "ste_iterations": ste.history.get("iterations_run")}
            res["uniform"] = e_uni
            res["jlcm_best"] = res["jlcm_proximal"] < min(res["uniform"], res["plain_kmeans"])
            row[f"b{bits}"] = res
        rows.append(row)
        print(json.dumps({"layer": la.fqn, **{b: (row[b] or {}).get("jlcm_best") for b in ("b3", "b2")}}), flush=True)
    summary = {}
    for b in ("b3", "b2"):
        rs = [r[b] for r in rows if r[b] is not None]
        summary[b] = {
            "layers": len(rs),
            "jlcm_best_fraction": sum(r["jlcm_best"] for r in rs) / len(rs),
            "jlcm_beats_uniform_fraction": sum(r["jlcm_proximal"] < r["uniform"] for r in rs) / len(rs),
            "jlcm_beats_plain_kmeans_fraction": sum(r["jlcm_proximal"] < r["plain_kmeans"] for r in rs) / len(rs),
            "proximal_beats_ste_fraction": sum(r["jlcm_proximal"] < r["jlcm_ste"] for r in rs) / len(rs),
            "max_bpw_gap": max(abs(r["uniform_bpw"] - r["codebook_bpw"]) for r in rs),
            "median_error": {k: statistics.median(r[k] for r in rs)
                             for k in ("uniform", "plain_kmeans", "jlcm_init", "jlcm_ste", "jlcm_proximal")},
            "geomean_error": {k: math.exp(sum(math.log(max(r[k], 1e-30)) for r in rs) / len(rs))
                              for k in ("uniform", "plain_kmeans", "jlcm_init", "jlcm_ste", "jlcm_proximal")},
        }
    n_weights = sum(la.num_weights for la in layers)
    return {"calibration": {"num_prompts": num_prompts, "steps": steps, "denoiser_calls": len(art.steps),
                            "seconds_calibration_run": round(t_cal, 1), "seconds_gram_replay": round(t_gram, 1),
                            "seconds_jlcm_learning_3bit_all_layers": round(t_learn[3], 1),
                            "seconds_jlcm_learning_2bit_all_layers": round(t_learn[2], 1)},
            "unet_sha256": unet_sha256(), "iterations": iterations, "layers": len(layers), "weights": n_weights,
            "summary": summary, "rows": rows}


E2E_PLANS = {
    # name: quantization settings (every Conv2d/Linear of the UNet; group sizes fall back per layer, see below)
    "int4_g64": {"backend": "uniform", "weights": {"bits": 4, "group_size": 64}, "activations": None},
    "int2_g64": {"backend": "uniform", "weights": {"bits": 2, "group_size": 64}, "activations": None},
    # 3-bit codes cost 3.2 bits (10 per int32 word): the feed-forward input projections take 2-bit codebooks so
    # that the whole UNet stays at or below 3.3 bits per weight, everything stored counted.
    "jlcm_3bit": {"backend": "jlcm", "weights": {"bits": 3}, "jlcm": {"groups": 8, "iterations": 60},
                  "overrides": [{"targets": ["re:.*ff\\.net\\.0\\.proj"], "backend": "jlcm", "weights": {"bits": 2},
                                 "jlcm": {"groups": 8, "iterations": 60}}]},
    # The same with the UNet's first and last layers (conv_in, conv_out: 0.3 % of the weights) on 4-bit codebooks,
    # as quantizers commonly keep the input and output layers at higher precision: still <= 3.3 bits per weight.
    "jlcm_3bit_io4": {"backend": "jlcm", "weights": {"bits": 3}, "jlcm": {"groups": 8, "iterations": 60},
                      "overrides": [{"targets": ["re:.*ff\\.net\\.0\\.proj"], "backend": "jlcm",
                                     "weights": {"bits": 2}, "jlcm": {"groups": 8, "iterations": 60}},
                                    {"targets": ["conv_in", "conv_out"], "backend": "jlcm", "weights": {"bits": 4},
                                     "jlcm": {"groups": 8, "iterations": 60}}]},
    "jlcm_2bit": {"backend": "jlcm", "weights": {"bits": 2}, "jlcm": {"groups": 16, "iterations": 60},
                  "overrides": [{"targets": ["conv_in", "conv_out"], "backend": "jlcm", "weights": {"bits": 3},
                                 "jlcm": {"groups": 8, "iterations": 60}}]},
}


def bench_e2e(num_prompts: int = 400, cal_prompts: int = 16, names: list[str] | None = None,
              cache: str | None = None, seeds: int = 2) -> dict:
    """Quantize the reference UNet with each plan, export, reload, and judge it (accuracy + Frechet at 4 steps)
    with ``seeds`` image seeds (prompts, real reference sets and generation noise all change with the seed): the
    spread over seeds is the run-to-run noise the comparisons are read against (``summary``)."""
    import tempfile

    from quantkit.config import parse_config
    from quantkit.export.writer import export_pipeline
    from quantkit.integrations.diffusers import load_pipeline
    from quantkit.models.layers import find_layers
    from quantkit.quantize import quantize_denoiser, resolve_plan
    from quantkit.quantize.plan import resolve_learning
    from quantkit.reference import DEFAULT_PIPELINE_DIR, evaluate_pipeline, load_reference_pipeline, unet_sha256
    from quantkit.stages import inspect_export

    _, layers, art, _ = _reference_calibration(cal_prompts, 4, cache)
    out: dict = {"model": str(DEFAULT_PIPELINE_DIR), "unet_sha256": unet_sha256(), "num_prompts": num_prompts,
                 "seeds": seeds, "plans": {}}
    fp = load_reference_pipeline()
    for seed in range(seeds):
        out[f"fp32_seed{seed}"] = evaluate_pipeline(fp, num_prompts=num_prompts, steps=(4,), seed=seed)["steps"]["4"]
        print(json.dumps({f"fp32_seed{seed}": out[f"fp32_seed{seed}"]}))
    for name in names or list(E2E_PLANS):
        q = dict(E2E_PLANS[name])
        if q["backend"] == "uniform":
            # Layers whose input size 64 does not divide use the largest group size <= 64 that does.
            gs = q["weights"]["group_size"]
            overrides = []
            for la in layers:
                if la.in_features % gs:
                    g = max(d for d in range(1, gs + 1) if la.in_features % d == 0)
                    overrides.append({"targets": [la.fqn], "weights": {**q["weights"], "group_size": g},
                                      "activations": None})
            q["overrides"] = overrides + list(q.get("overrides", []))
        cfg = parse_config({"model": "builtin:digits", "quantization": q})
        pipe = load_reference_pipeline()
        t = time.perf_counter()
        plan = resolve_plan(find_layers(pipe.unet), cfg.quantization)
        quantize_denoiser(pipe.unet, plan, art, progress=False, learning=resolve_learning(plan, cfg.quantization))
        t_q = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            export_pipeline(pipe, "unet", plan, Path(tmp) / "q")
            info = inspect_export(Path(tmp) / "q")
            qpipe = load_pipeline(Path(tmp) / "q")
            n = sum(math.prod(r["shape"]) for r in info["layers"])
            bpw = sum(r["bits_per_weight"] * math.prod(r["shape"]) for r in info["layers"]) / n
            res = {"bits_per_weight": round(bpw, 4), "quantize_seconds": round(t_q, 1)}
            for seed in range(seeds):
                res[f"seed{seed}"] = evaluate_pipeline(qpipe, num_prompts=num_prompts, steps=(4,), seed=seed)["steps"][
                    "4"]
        out["plans"][name] = res
        print(json.dumps({name: res}))
    out["summary"] = _e2e_summary(out, seeds)
    return out


def _e2e_summary(out: dict, seeds: int) -> dict:
    """Per pipeline: mean and sample std over seeds of digit accuracy and Frechet; per plan, the paired difference
    to uniform INT4 g64 (same seeds) with its std."""
    def stats(vals):
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return {"mean": round(m, 4), "std": round(sd, 4)}

    runs = {"fp32": [out[f"fp32_seed{s}"] for s in range(seeds)]}
    runs.update({name: [res[f"seed{s}"] for s in range(seeds)] for name, res in out["plans"].items()})
    summary = {name: {"digit": stats([r["accuracy"]["digit"] for r in rs]),
                      "frechet": stats([r["frechet"] for r in rs])} for name, rs in runs.items()}
    if "int4_g64" in runs:
        base = runs["int4_g64"]
        for name, rs in runs.items():
            if name != "int4_g64":
                summary[name]["minus_int4_g64"] = {
                    "digit": stats([a["accuracy"]["digit"] - b["accuracy"]["digit"] for a, b in zip(rs, base)]),
                    "frechet": stats([a["frechet"] - b["frechet"] for a, b in zip(rs, base)])}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["kernels", "layers", "e2e"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--plans", nargs="*", default=None)
    ap.add_argument("--calibration-cache", default=None, help="folder to save / reuse the calibration artifact")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the kernel benchmark")
    ap.add_argument("--seeds", type=int, default=2, help="image seeds per pipeline for e2e (the noise estimate)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "kernels":
        result = bench_kernels()
    elif args.what == "layers":
        result = bench_layers(cache=args.calibration_cache)
    else:
        result = bench_e2e(**({"num_prompts": args.num_prompts} if args.num_prompts else {}), names=args.plans,
                           cache=args.calibration_cache, seeds=args.seeds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"jlcm_{args.what}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
