"""One denoising step of a full-size UNet (random weights), float vs quantkit W8A8 / W8A7 / W4A8 / W4A16.

    PYTHONPATH=src python benchmarks/unet.py                  # CPU: SD-Turbo (SD 2.1 UNet) at 512x512, fp32
    PYTHONPATH=src python benchmarks/unet.py --device cuda    # GPU: SDXL UNet at 1024x1024, fp16, CUDA graphs

Every variant runs in its own process, so its peak memory is its own: CPU peak resident memory (VmHWM, reset
after the model is built and quantized), GPU
peak allocated memory (torch.cuda.max_memory_allocated over a step, weights included). All Linear and Conv2d
layers (groups = 1) are quantized, round to nearest: W8A8 and W4A8 per-channel symmetric weights with static
per-tensor activation scales (as MixDQ), W4A16 4-bit weights with group size 64 (the configs' choice). Timing:
CPU, the median of --steps steps after a warm-up; GPU, the step captured in a CUDA graph and replayed (eager
times are reported too). On the CPU the quantized model is compacted (quantkit.compact, as loading an export on
the CPU does: each weight held once, in the kernels' tile layout); --no-compact keeps the canonical codes plus
the repack cache (two copies). On a GPU, compaction gives 8-bit and 4-bit integer layers the resident layout of the
Triton kernels (quantkit.ops.resident); --no-compact, or a variant named with an engine ("w8a8:cublaslt"), keeps
the canonical codes on the cuBLASLt (or opt-in Triton) path; "w8a8+triton" / "w8a8+cutlass" keep the resident
layout and set QUANTKIT_INT8_GEMM for that variant's process (the 8-bit linears' engine on Hopper, where the CUTLASS
GEMM is the default once its library is there), so both engines time side by side in one call. --profile adds
the GPU time by kernel of one step; --fuse applies quantkit.fuse to quantized variants (GEGLU gating with the output
linear's activation quantization in one kernel; one q/k/v projection) and diffusers' fuse_qkv_projections to fp, so
both sides fuse their projections.
Writes benchmarks/results/unet-<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp", "w8a8", "w8a7", "w4a8", "w4a16")
ACT_RANGE = (-6.0, 6.0)  # static activation range given to every layer (speed does not depend on its value)


def _scheme(variant: str):
    from quantkit.formats.spec import ActFormat, LayerScheme, WeightFormat

    return {
        "w8a8": LayerScheme(WeightFormat(8), ActFormat(8)),
        "w8a7": LayerScheme(WeightFormat(8), ActFormat(7)),
        "w4a8": LayerScheme(WeightFormat(4), ActFormat(8)),
        "w4a16": LayerScheme(WeightFormat(4, 64)),
    }[variant]


def build(arch: str, device: str, dtype, seed: int = 0):
    """A full-size denoiser with random fan-in-scaled weights, built directly on ``device``."""
    import torch

    from quantkit.models.architectures import build_denoiser

    model = build_denoiser(arch, "meta").to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / max(p[0].numel(), 1) ** 0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for buf in model.buffers():
            buf.zero_()
    return model.eval()


def quantize_all(model, variant: str) -> int:
    """Replace every quantizable layer by its quantized twin, in place; return how many."""
    from quantkit.nn.modules import is_quantizable, quantize_module

    scheme = _scheme(variant)
    names = [n for n, m in model.named_modules() if is_quantizable(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        act_range = ACT_RANGE if scheme.act is not None and not scheme.act.dynamic else None
        layer_scheme = scheme
        k = module.weight[0].numel()
        if scheme.weight.group_size > 0 and k % scheme.weight.group_size:  # e.g. conv_in (K = 36): per channel
            layer_scheme = dataclasses.replace(scheme, weight=dataclasses.replace(scheme.weight, group_size=-1))
        setattr(parent, child, quantize_module(module, layer_scheme, act_range=act_range))
    return len(names)


def inputs(arch: str, resolution: int, device: str, dtype):
    import torch

    from quantkit.models.architectures import ARCHITECTURES

    cfg = ARCHITECTURES[arch][1]
    lat = resolution // 8
    g = torch.Generator(device=device).manual_seed(1)
    kw = {
        "sample": torch.randn(1, cfg["in_channels"], lat, lat, generator=g, device=device).to(dtype),
        "timestep": torch.tensor([999], device=device),
        "encoder_hidden_states": torch.randn(1, 77, cfg["cross_attention_dim"], generator=g, device=device).to(dtype),
    }
    if cfg.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, generator=g, device=device).to(dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device).to(dtype),
        }
    return kw


def child(args) -> dict:
    import torch

    import quantkit
    import quantkit.ops
    from quantkit.bench import peak_rss_mib, reset_peak_rss

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    # "w8a8:cublaslt" / "w8a8:triton": canonical weights (not compacted), the CUDA integer linears on that engine
    variant, _, engine = args.variant.partition(":")
    variant, _, int8_gemm = variant.partition("+")
    if int8_gemm:  # "w8a8+triton": the resident layout with QUANTKIT_INT8_GEMM set for this process only
        os.environ["QUANTKIT_INT8_GEMM"] = int8_gemm
    if engine:
        quantkit.ops.cuda.set_gemm_engine(engine)
    t0 = time.perf_counter()
    model = build(args.arch, device, dtype)
    layers = quantize_all(model, variant) if variant != "fp" else 0
    compacted = 0
    if args.compact and not engine:
        # as loading an export on the CPU does; on a GPU, the resident layout of the Triton kernels
        compacted = quantkit.compact(model)
    fused = 0
    if args.fuse:  # quantkit.fuse; FP16 gets diffusers' own fused q/k/v projections, so the baseline has them too
        fused = quantkit.fuse(model) if layers else model.fuse_qkv_projections() or 0
    resident_layers = sum(1 for m in model.modules()
                          if getattr(m, "weight_packed", None) is not None and m.weight_packed.dtype == torch.int8)
    build_s = time.perf_counter() - t0
    kw = inputs(args.arch, args.resolution, device, dtype)

    def step():
        return model(**kw, return_dict=False)[0]

    out = {"variant": args.variant, "arch": args.arch, "resolution": args.resolution, "device": device,
           "dtype": str(dtype), "quantized_layers": layers, "build_and_quantize_s": build_s,
           "compacted_mib": compacted / 2**20, "resident_layers": resident_layers, "fused_blocks": fused,
           "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("QUANTKIT_")}}
    with torch.no_grad():
        if device == "cpu":
            torch.set_num_threads(args.threads)
            out["threads"] = torch.get_num_threads()
            out["native_kernels"] = quantkit.ops.native_status()["loaded"]
            step()  # warm-up (fills the repacked-weight cache, as loading would)
            reset_peak_rss()  # the peak covers the loaded model and its steps, as after loading an export
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            out["step_s"] = statistics.median(times)
            out["step_s_all"] = times
            out["peak_rss_mib"] = peak_rss_mib()
        else:
            out["gpu"] = torch.cuda.get_device_name()
            out["cuda_kernels"] = quantkit.ops.cuda_status()["loaded"]
            from quantkit.ops import triton_gemm

            out["gemm_engine"] = (("resident" if resident_layers else "triton" if quantkit.ops.cuda._triton_ok()
                                   else "cublaslt") if layers else None)
            out["triton"] = triton_gemm.available()
            from quantkit.nn.fuse import groupnorm_selected
            from quantkit.ops import resident

            out["modes"] = {"resident_w4": resident._w4_mode(), "w4_expand": triton_gemm.w4_expand_selected(),
                            "conv_quant_fused": triton_gemm.conv_quant_fused_selected(),  # switches or defaults
                            "fuse_groupnorm": args.fuse and groupnorm_selected()}
            torch.cuda.synchronize()
            out["weights_mib"] = torch.cuda.memory_allocated() / 2**20
            step()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            y = step()
            torch.cuda.synchronize()
            out["eager_step_s_first"] = time.perf_counter() - t
            out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["output_finite"] = bool(torch.isfinite(y).all())
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            out["eager_step_s"] = statistics.median(times)
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    step()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                graph.replay()
                torch.cuda.synchronize()
                gtimes = []
                for _ in range(args.steps):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    torch.cuda.synchronize()
                    gtimes.append(start.elapsed_time(end) / 1e3)
                out["graph_step_s"] = statistics.median(gtimes)
                out["peak_mib_with_graph"] = torch.cuda.max_memory_allocated() / 2**20
            except Exception as exc:  # report, don't hide: the eager numbers still stand
                out["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
            out["step_s"] = out.get("graph_step_s", out["eager_step_s"])
            if args.profile:
                out["profile"] = _profile(step)
    return out


def _profile(step, top: int = 25) -> dict:
    """GPU time of one eager step by kernel: the ``top`` kernels and the totals of the GEMM-like and other work."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if us > 0:
            kernels.append({"name": ev.key[:160], "calls": ev.count, "us": us})
    kernels.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in kernels)
    return {"total_us": total, "top": kernels[:top]}


def markdown(rows: list[dict], device: str) -> str:
    base = next((r for r in rows if r["variant"] == "fp"), None)
    if device == "cpu":
        head = "| variant | step (s) | speed-up vs FP32 | peak RSS (MiB) | vs FP32 |"
    else:
        head = "| variant | step, CUDA graph (ms) | eager (ms) | speed-up vs FP16 | peak GPU memory (MiB) | vs FP16 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} |")
            continue
        speed = base["step_s"] / r["step_s"] if base else float("nan")
        if device == "cpu":
            mem = r["peak_rss_mib"]
            rel = mem / base["peak_rss_mib"] if base else float("nan")
            lines.append(f"| {r['variant']} | {r['step_s']:.2f} | {speed:.2f}x | {mem:.0f} | {rel:.2f}x |")
        else:
            mem = r["peak_mib"]
            rel = mem / base["peak_mib"] if base else float("nan")
            lines.append(f"| {r['variant']} | {r['step_s'] * 1e3:.2f} | {r['eager_step_s'] * 1e3:.2f} | {speed:.2f}x "
                         f"| {mem:.0f} | {rel:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--arch", default=None, help="default: sd-turbo on CPU, sdxl on CUDA")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (sd-turbo), 1024 (sdxl)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compact", dest="compact", action="store_false",
                        help="keep the canonical codes (cpu: kernel layout in the repack cache, two copies; cuda: "
                             "no resident layout, the cuBLASLt path)")
    parser.add_argument("--profile", action="store_true", help="cuda: GPU time by kernel of one eager step")
    parser.add_argument("--fuse", action="store_true",
                        help="quantkit.fuse on quantized variants (GEGLU + quantization, one q/k/v projection); "
                             "diffusers' fuse_qkv_projections on fp")
    parser.add_argument("--json", default=None)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.arch = args.arch or ("sdxl" if args.device == "cuda" else "sd-turbo")
    args.resolution = args.resolution or (1024 if args.arch == "sdxl" else 512)
    args.steps = args.steps or (20 if args.device == "cuda" else 3)
    if args.variant:  # child process: one variant
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--device", args.device, "--arch", args.arch, "--resolution",
               str(args.resolution), "--steps", str(args.steps), "--threads", str(args.threads), "--variant", variant]
        if not args.compact:
            cmd.append("--no-compact")
        if args.profile:
            cmd.append("--profile")
        if args.fuse:
            cmd.append("--fuse")
        print(f"running {variant} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            rows.append({"variant": variant, "error": (proc.stderr or proc.stdout)[-2000:]})
            print(rows[-1]["error"], file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"unet-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2))
    print(markdown(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
