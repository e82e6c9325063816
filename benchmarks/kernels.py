"""Kernel benchmarks: quantkit's native CPU kernels against fp32, PyTorch's dynamic int8 Linear (fbgemm),
optimum-quanto and SDNQ (each where installed).

Shapes are the Linear and Conv2d layers of real UNets (SD-Turbo / SD 2.1 at 512 px, 64x64 latents; SDXL at
1024 px, 128x128 latents), with random weights. Every method runs in one process with torch.set_num_threads(2)
and no_grad, timed as the median of repeated calls after a warm-up call (which also fills quantkit's
repacked-weight cache, as loading a model would). Dynamic activation quantization (per token / per sample) is
part of every W8A8 / W4A8 timing.

    PYTHONPATH=src python benchmarks/kernels.py            # full run (about 10-20 minutes on 2 cores)
    PYTHONPATH=src python benchmarks/kernels.py --quick    # a small subset
    PYTHONPATH=src python benchmarks/kernels.py --device cuda   # GPU kernels (benchmarks/cuda_kernels.py)

Writes benchmarks/results/kernels.json and docs/results-kernels.md, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import quantkit.ops  # noqa: F401  (ops + native kernels)
from quantkit.formats import WeightFormat, pack, quantize_weight
from quantkit.ops import native

ROOT = Path(__file__).resolve().parents[1]

# (model, layer, M, K, N): M = tokens (batch 1), K = in_features, N = out_features.
LINEAR_SHAPES = [
    ("sd-turbo", "time_embedding.linear_1", 1, 320, 1280),
    ("sd-turbo", "resnet.time_emb_proj", 1, 1280, 1280),
    ("sd-turbo", "down0.attn2.to_k (text)", 77, 1024, 320),
    ("sd-turbo", "down2.attn2.to_v (text)", 77, 1024, 1280),
    ("sd-turbo", "down0.attn1.to_q", 4096, 320, 320),
    ("sd-turbo", "down0.ff.proj (GEGLU)", 4096, 320, 2560),
    ("sd-turbo", "down0.ff.out", 4096, 1280, 320),
    ("sd-turbo", "down1.attn1.to_q", 1024, 640, 640),
    ("sd-turbo", "down1.ff.proj (GEGLU)", 1024, 640, 5120),
    ("sd-turbo", "down1.ff.out", 1024, 2560, 640),
    ("sd-turbo", "down2.attn1.to_q", 256, 1280, 1280),
    ("sd-turbo", "down2.ff.proj (GEGLU)", 256, 1280, 10240),
    ("sd-turbo", "down2.ff.out", 256, 5120, 1280),
    ("sdxl", "add_embedding.linear_1", 1, 2816, 1280),
    ("sdxl", "down2.attn2.to_k (text)", 77, 2048, 1280),
    ("sdxl", "down1.attn1.to_q", 4096, 640, 640),
    ("sdxl", "down1.ff.proj (GEGLU)", 4096, 640, 5120),
    ("sdxl", "down1.ff.out", 4096, 2560, 640),
    ("sdxl", "down2.attn1.to_out", 1024, 1280, 1280),
    ("sdxl", "down2.ff.proj (GEGLU)", 1024, 1280, 10240),
    ("sdxl", "down2.ff.out", 1024, 5120, 1280),
]
LINEAR_QUICK = ["resnet.time_emb_proj", "down2.attn2.to_v (text)", "down1.attn1.to_q", "down2.ff.out"]

# (model, layer, C, H, W, O, kernel, stride); batch 1.
CONV_SHAPES = [
    ("sd-turbo", "conv_in", 4, 64, 64, 320, 3, 1),
    ("sd-turbo", "down0.resnet.conv", 320, 64, 64, 320, 3, 1),
    ("sd-turbo", "down0.downsample", 320, 64, 64, 320, 3, 2),
    ("sd-turbo", "down1.resnet.conv1", 320, 32, 32, 640, 3, 1),
    ("sd-turbo", "down1.resnet.conv_shortcut", 320, 32, 32, 640, 1, 1),
    ("sd-turbo", "down1.resnet.conv2", 640, 32, 32, 640, 3, 1),
    ("sd-turbo", "down2.resnet.conv2", 1280, 16, 16, 1280, 3, 1),
    ("sd-turbo", "up1.resnet.conv1 (concat)", 2560, 16, 16, 1280, 3, 1),
    ("sd-turbo", "up1.resnet.conv_shortcut", 2560, 16, 16, 1280, 1, 1),
    ("sd-turbo", "up3.resnet.conv1 (concat)", 640, 64, 64, 320, 3, 1),
    ("sd-turbo", "up3.resnet.conv_shortcut", 640, 64, 64, 320, 1, 1),
    ("sd-turbo", "conv_out", 320, 64, 64, 4, 3, 1),
    ("sdxl", "down1.resnet.conv2", 640, 64, 64, 640, 3, 1),
    ("sdxl", "down2.resnet.conv2", 1280, 32, 32, 1280, 3, 1),
    ("sdxl", "down2.resnet.conv_shortcut", 640, 32, 32, 1280, 1, 1),
]
CONV_QUICK = ["down1.resnet.conv2", "down2.resnet.conv2", "up3.resnet.conv_shortcut"]


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), for spotting other load."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0.0, 0.0
    busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system


INTERFERENCE = {"retries": 0, "worst_other_load": 0.0, "waited_s": 0.0}


def other_load(seconds: float = 2.0) -> float:
    """Fraction of all CPUs used by other processes over `seconds` (this process idles meanwhile)."""
    busy0, own0 = _cpu_seconds()
    time.sleep(seconds)
    busy1, own1 = _cpu_seconds()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (seconds * (os.cpu_count() or 1))


def wait_for_quiet(max_wait: float) -> None:
    """Block until other processes use less than 10 % of the CPUs (or max_wait seconds have passed)."""
    start = time.perf_counter()
    while other_load() >= 0.10 and time.perf_counter() - start < max_wait:
        time.sleep(10.0)
    INTERFERENCE["waited_s"] += time.perf_counter() - start


def timeit(fn, min_time: float, max_reps: int, attempts: int = 10) -> float:
    """Median seconds per call after one warm-up call; repeats until min_time is spent (at least 5 calls).

    The machine is shared: when other processes used more than 10 % of the CPUs during a measurement (from
    /proc/stat minus this process's own CPU time), it waits and measures again (up to `attempts` times).
    """
    fn()
    ncpu = os.cpu_count() or 1
    for attempt in range(attempts):
        busy0, own0 = _cpu_seconds()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < max_reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        busy1, own1 = _cpu_seconds()
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * ncpu)
        if other < 0.10 or attempt == attempts - 1:
            INTERFERENCE["worst_other_load"] = max(INTERFERENCE["worst_other_load"], other)
            return statistics.median(times)
        INTERFERENCE["retries"] += 1
        wait_for_quiet(600.0)
    raise AssertionError("unreachable")


def measure(methods: dict, args) -> dict[str, float]:
    """Seconds per call of every method: `args.rounds` rounds over all methods in turn, and for each method the
    fastest round's median (load from other processes only ever slows a round down)."""
    wait_for_quiet(args.max_wait)
    best: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in methods.items():
                t = timeit(fn, args.min_time, args.max_reps)
                best[name] = min(best.get(name, t), t)
    return best


def packed(w: torch.Tensor, bits: int, group_size: int = -1):
    codes, scale, zp = quantize_weight(w, WeightFormat(bits, group_size, True))
    return pack(codes, bits), scale, zp


def w4a16_group(k: int) -> int:
    return 64 if k % 64 == 0 else -1


def geomean(values) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# The peers' int8 x int8 paths are naive on the CPU (quanto: a plain matmul; SDNQ: torch._int_mm): time them only on
# layers up to this many multiply-adds.
PEER_INT8_MAX_MACS = 2e8
PEER_INT8_MAX = f"{PEER_INT8_MAX_MACS:.0e}".replace("e+0", "e")  # as printed: 2e8


def dense_linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    """An fp32 nn.Linear holding ``w`` and ``b`` (what the peer libraries quantize)."""
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def quanto_linears(w: torch.Tensor, b: torch.Tensor):
    """optimum-quanto Linear modules (int8 weights; int8 weights + int8 activations; int4 weights), or {}."""
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize
    except ImportError:
        return {}
    out = {}
    for name, weights, acts in [
        ("quanto_w8a16", qint8, None),
        ("quanto_w4a16", qint4, None),
        ("quanto_w8a8", qint8, qint8),
    ]:
        model = nn.Sequential(dense_linear(w, b))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize(model, weights=weights, activations=acts)
                freeze(model)
        except Exception as exc:  # e.g. a shape its int4 packing does not support
            print(f"    {name}: not available for this shape ({exc})", flush=True)
            continue
        out[name] = model
    return out


# SDNQ (SD.Next's quantization engine, `pip install sdnq`): int8 / int4 weights dequantized in the forward
# (W8A16, W4A16) and its int8 x int8 quantized-matmul path (W8A8, up to PEER_INT8_MAX_MACS).
SDNQ_VARIANTS = (
    ("sdnq_w8a16", {"weights_dtype": "int8"}),
    ("sdnq_w4a16", {"weights_dtype": "int4"}),
    ("sdnq_w8a8", {"weights_dtype": "int8", "use_quantized_matmul": True, "use_quantized_matmul_conv": True}),
)


def sdnq_modules(layer: nn.Module, macs: float) -> dict:
    """SDNQ-quantized copies of ``layer`` (Linear or Conv2d), or {} when sdnq is not installed."""
    try:
        from sdnq import sdnq_post_load_quant
    except ImportError:
        return {}
    import copy

    out = {}
    for name, kw in SDNQ_VARIANTS:
        if name == "sdnq_w8a8" and macs > PEER_INT8_MAX_MACS:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = sdnq_post_load_quant(nn.Sequential(copy.deepcopy(layer)), torch_dtype=torch.float32,
                                                 quant_conv=True, **kw)
        except Exception as exc:  # a shape or dtype its packing does not support
            print(f"    {name}: not available for this shape ({exc})", flush=True)
    return out


def bench_linear(shapes, args) -> list[dict]:
    from torch.ao.quantization import quantize_dynamic

    rows = []
    for model, layer, m, k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k) / math.sqrt(k)
        b = torch.randn(n) * 0.1
        x = torch.randn(m, k)
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        q8, s8, _ = packed(w, 8)
        q4, s4, _ = packed(w, 4)
        g = w4a16_group(k)
        q4g, s4g, _ = packed(w, 4, g)
        ops = torch.ops.quantkit
        methods = {
            "fp32": lambda: F.linear(x, w, b),
            "torch_int8_dynamic": lambda: dyn(x),
            "w8a8": lambda: ops.gemm_w8a8(x, q8, s8, None, b, None, None, 8, -1, 8),
            "w8a7": lambda: ops.gemm_w8a8(x, q8, s8, None, b, None, None, 8, -1, 7),
            "w4a8": lambda: ops.gemm_w4a8(x, q4, s4, None, b, None, None, 4, -1, 8),
            "w4a16": lambda: ops.gemm_w4a16(x, q4g, s4g, None, b, None, None, 4, g, 16),
        }
        if args.quanto:
            for name, mod in quanto_linears(w, b).items():
                # quanto's int8 x int8 path is a naive matmul on CPU: only time it where it finishes quickly.
                if name == "quanto_w8a8" and m * k * n > PEER_INT8_MAX_MACS:
                    continue
                methods[name] = lambda mod=mod: mod(x)
        if args.sdnq:
            for name, mod in sdnq_modules(dense_linear(w, b), m * k * n).items():
                methods[name] = lambda mod=mod: mod(x)
        row = {"model": model, "layer": layer, "M": m, "K": k, "N": n, "w4a16_group": g, "seconds": {}}
        row["seconds"] = measure(methods, args)
        fp = row["seconds"]["fp32"]
        row["speedup_vs_fp32"] = {k_: fp / v for k_, v in row["seconds"].items()}
        row["w8a8_vs_torch_int8"] = row["seconds"]["torch_int8_dynamic"] / row["seconds"]["w8a8"]
        row["w8a7_vs_torch_int8"] = row["seconds"]["torch_int8_dynamic"] / row["seconds"]["w8a7"]
        rows.append(row)
        print(
            f"  linear {model:8s} {layer:28s} M={m:<5d} K={k:<5d} N={n:<6d} "
            + " ".join(f"{k_}={v:.2f}x" for k_, v in row["speedup_vs_fp32"].items() if k_ != "fp32"),
            flush=True,
        )
    return rows


def bench_conv(shapes, args) -> list[dict]:
    rows = []
    for model, layer, c, h, wd, o, ks, st in shapes:
        torch.manual_seed(0)
        w = torch.randn(o, c, ks, ks) / math.sqrt(c * ks * ks)
        b = torch.randn(o) * 0.1
        x = torch.randn(1, c, h, wd)
        pad = ks // 2
        geo = ([ks, ks], [st, st], [pad, pad], [1, 1])
        q8, s8, _ = packed(w, 8)
        q4, s4, _ = packed(w, 4)
        g = w4a16_group(c * ks * ks)
        q4g, s4g, _ = packed(w, 4, g)
        ops = torch.ops.quantkit
        methods = {
            "fp32": lambda: F.conv2d(x, w, b, st, pad),
            "w8a8": lambda: ops.conv2d_w8a8(x, q8, s8, None, b, None, None, 8, -1, 8, *geo),
            "w8a7": lambda: ops.conv2d_w8a8(x, q8, s8, None, b, None, None, 8, -1, 7, *geo),
            "w4a8": lambda: ops.conv2d_w4a8(x, q4, s4, None, b, None, None, 4, -1, 8, *geo),
            "w4a16": lambda: ops.conv2d_w4a16(x, q4g, s4g, None, b, None, None, 4, g, 16, *geo),
        }
        if args.sdnq:
            dense = nn.Conv2d(c, o, ks, st, pad)
            with torch.no_grad():
                dense.weight.copy_(w)
                dense.bias.copy_(b)
            ho, wo = (h + 2 * pad - ks) // st + 1, (wd + 2 * pad - ks) // st + 1
            for name, mod in sdnq_modules(dense, ho * wo * o * c * ks * ks).items():
                methods[name] = lambda mod=mod: mod(x)
        row = {
            "model": model,
            "layer": layer,
            "C": c,
            "H": h,
            "W": wd,
            "O": o,
            "kernel": ks,
            "stride": st,
            "w4a16_group": g,
            "seconds": {},
        }
        row["seconds"] = measure(methods, args)
        fp = row["seconds"]["fp32"]
        row["speedup_vs_fp32"] = {k_: fp / v for k_, v in row["seconds"].items()}
        rows.append(row)
        print(
            f"  conv   {model:8s} {layer:28s} {c}->{o} {ks}x{ks}/s{st} @{h}x{wd} "
            + " ".join(f"{k_}={v:.2f}x" for k_, v in row["speedup_vs_fp32"].items() if k_ != "fp32"),
            flush=True,
        )
    return rows


def summarize(linear: list[dict], conv: list[dict]) -> dict:
    s: dict = {}
    if linear:
        methods = [m for m in linear[0]["speedup_vs_fp32"] if m != "fp32"]
        s["linear_geomean_vs_fp32"] = {
            m: geomean(r["speedup_vs_fp32"].get(m) for r in linear)
            for m in methods
            if all(m in r["speedup_vs_fp32"] for r in linear)
        }
        s["linear_w8a8_vs_torch_int8_geomean"] = geomean(r["w8a8_vs_torch_int8"] for r in linear)
        s["linear_w8a7_vs_torch_int8_geomean"] = geomean(r["w8a7_vs_torch_int8"] for r in linear)
        s["linear_w4a8_vs_w8a8_geomean"] = geomean(r["seconds"]["w8a8"] / r["seconds"]["w4a8"] for r in linear)
        s["linear_w4a16_vs_fp32_M_ge_256"] = geomean(r["speedup_vs_fp32"]["w4a16"] for r in linear if r["M"] >= 256)
        s["linear_w4a16_vs_fp32_M_1"] = geomean(r["speedup_vs_fp32"]["w4a16"] for r in linear if r["M"] == 1)
        by_m = {}
        for m_ in sorted({r["M"] for r in linear}):
            sub = [r for r in linear if r["M"] == m_]
            by_m[str(m_)] = {
                meth: geomean(r["speedup_vs_fp32"][meth] for r in sub)
                for meth in ("torch_int8_dynamic", "w8a8", "w8a7", "w4a8", "w4a16")
            }
        s["linear_geomean_vs_fp32_by_M"] = by_m
    if conv:
        s["conv_geomean_vs_fp32"] = {
            m: geomean(r["speedup_vs_fp32"][m] for r in conv) for m in ("w8a8", "w8a7", "w4a8", "w4a16")
        }
    # Peers over the shapes where they ran (their int8 x int8 paths skip the large ones).
    s["peers_geomean_vs_fp32"] = {
        kind: {m: {"geomean": geomean(r["speedup_vs_fp32"][m] for r in rows if m in r["speedup_vs_fp32"]),
                   "shapes": sum(m in r["speedup_vs_fp32"] for r in rows)}
               for m in peer_columns(rows)}
        for kind, rows in (("linear", linear), ("conv", conv)) if rows
    }
    return s


def markdown(result: dict) -> str:
    meta, s = result["meta"], result["summary"]
    lines = [
        "# Kernel benchmarks (CPU)",
        "",
        f"Generated by `benchmarks/kernels.py{' --quick' if meta['quick'] else ''}` on {meta['date']}: "
        f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, quantkit kernels `{meta['isa']}`. "
        "Speed-ups are fp32 time / method time (higher is better); each time is the median of repeated calls, "
        f"best of {meta.get('rounds', 1)} rounds over all methods; "
        "W8A8, W8A7 and W4A8 include dynamic per-token (Linear) or per-sample (Conv2d) activation quantization. "
        "W8A7 is W8A8 with 7-bit activation codes (fbgemm's reduce_range), the vpmaddubsw path of the kernels. "
        "Weights: W8 and W4 per output channel, symmetric; W4A16 with groups of 64 along K where 64 divides K.",
        "",
    ]
    if "linear_geomean_vs_fp32" in s:
        lines += ["## Summary", "", "| metric | value | target |", "|---|---|---|"]
        g = s["linear_geomean_vs_fp32"]
        lines.append(f"| Linear W8A8 vs fp32 (geomean) | {g['w8a8']:.2f}x | >= 2.0x |")
        lines.append(
            f"| Linear W8A8 vs torch dynamic int8 (geomean) | {s['linear_w8a8_vs_torch_int8_geomean']:.2f}x"
            " | >= 1.15x |"
        )
        lines.append(f"| Linear W8A7 (7-bit activations) vs fp32 (geomean) | {g['w8a7']:.2f}x | - |")
        lines.append(
            f"| Linear W8A7 vs torch dynamic int8 (geomean) | {s['linear_w8a7_vs_torch_int8_geomean']:.2f}x | - |"
        )
        lines.append(f"| Linear W4A8 vs W8A8 (geomean) | {s['linear_w4a8_vs_w8a8_geomean']:.2f}x | >= 1.0x |")
        lines.append(f"| Linear W4A16 vs fp32, M >= 256 | {s['linear_w4a16_vs_fp32_M_ge_256']:.2f}x | >= 0.9x |")
        lines.append(f"| Linear W4A16 vs fp32, M = 1 | {s['linear_w4a16_vs_fp32_M_1']:.2f}x | >= 2.0x |")
        if "conv_geomean_vs_fp32" in s:
            c = s["conv_geomean_vs_fp32"]
            lines.append(f"| Conv2d W8A8 vs fp32 (geomean) | {c['w8a8']:.2f}x | >= 1.8x |")
            lines.append(f"| Conv2d W8A7 vs fp32 (geomean) | {c['w8a7']:.2f}x | - |")
            lines.append(f"| Conv2d W4A8 vs fp32 (geomean) | {c['w4a8']:.2f}x | >= 1.8x |")
            lines.append(f"| Conv2d W4A16 vs fp32 (geomean) | {c['w4a16']:.2f}x | - |")
        for kind, peers in s.get("peers_geomean_vs_fp32", {}).items():
            for m, v in peers.items():
                lines.append(f"| {kind.capitalize()} {m} vs fp32 (geomean over {v['shapes']} shapes) | "
                             f"{v['geomean']:.2f}x | - |")
        lines += [
            "",
            "Linear geomean speed-up vs fp32 by M:",
            "",
            "| M | torch int8 dynamic | W8A8 | W8A7 | W4A8 | W4A16 |",
            "|---|---|---|---|---|---|",
        ]
        for m_, d in s["linear_geomean_vs_fp32_by_M"].items():
            lines.append(
                f"| {m_} | {d['torch_int8_dynamic']:.2f}x | {d['w8a8']:.2f}x | {d['w8a7']:.2f}x | {d['w4a8']:.2f}x "
                f"| {d['w4a16']:.2f}x |"
            )
        lines.append("")
    if result["linear"]:
        extra = peer_columns(result["linear"])
        head = ["model", "layer", "M", "K", "N", "fp32 ms", "torch int8 dyn", "W8A8", "W8A7", "W4A8", "W4A16", *extra]
        lines += ["## Linear", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in result["linear"]:
            sp = r["speedup_vs_fp32"]
            cells = [
                r["model"],
                r["layer"],
                str(r["M"]),
                str(r["K"]),
                str(r["N"]),
                f"{r['seconds']['fp32'] * 1e3:.2f}",
                *(f"{sp[m]:.2f}x" for m in ("torch_int8_dynamic", "w8a8", "w8a7", "w4a8", "w4a16")),
                *(f"{sp[m]:.2f}x" if m in sp else "skipped" for m in extra),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if any(m.startswith("quanto") for m in extra):
            lines += [
                "optimum-quanto columns: `quantize(weights=qint8|qint4, activations=None|qint8)` + `freeze`; "
                f"its int8 x int8 path is skipped where M*K*N > {PEER_INT8_MAX} (it falls back to a naive "
                "matmul).",
                "",
            ]
        if any(m.startswith("sdnq") for m in extra):
            lines += [
                "SDNQ columns: `sdnq_post_load_quant(weights_dtype=int8|int4, use_quantized_matmul=False|True)` "
                f"(its CPU path; no OpenVINO); its int8 x int8 path is skipped where M*K*N > {PEER_INT8_MAX}.",
                "",
            ]
    if result["conv"]:
        cextra = peer_columns(result["conv"])
        head = ["model", "layer", "C->O", "kernel", "input", "fp32 ms", "W8A8", "W8A7", "W4A8", "W4A16", *cextra]
        lines += ["## Conv2d", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in result["conv"]:
            sp = r["speedup_vs_fp32"]
            cells = [
                r["model"],
                r["layer"],
                f"{r['C']}->{r['O']}",
                f"{r['kernel']}x{r['kernel']}/s{r['stride']}",
                f"{r['H']}x{r['W']}",
                f"{r['seconds']['fp32'] * 1e3:.2f}",
                *(f"{sp[m]:.2f}x" for m in ("w8a8", "w8a7", "w4a8", "w4a16")),
                *(f"{sp[m]:.2f}x" if m in sp else "skipped" for m in cextra),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    notes = list(meta.get("notes", []))
    inter = meta.get("interference")
    if inter:
        notes.append(
            f"The machine is shared: a measurement was repeated when other processes used more than 10 % of "
            f"the CPUs ({inter['retries']} repeats in this run; highest other load kept: "
            f"{inter['worst_other_load']:.0%}), and each shape started on a quiet machine "
            f"({inter.get('waited_s', 0.0):.0f} s spent waiting for one)."
        )
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def peer_columns(rows: list[dict]) -> list[str]:
    """The peer libraries' columns (quanto_*, sdnq_*) present in any row, in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [m for m in r["seconds"] if m.startswith(("quanto", "sdnq")) and m not in cols]
    return cols


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--no-quanto", dest="quanto", action="store_false", help="skip optimum-quanto")
    parser.add_argument("--no-sdnq", dest="sdnq", action="store_false", help="skip SDNQ")
    parser.add_argument("--only", choices=["linear", "conv", "gemv"], default=None,
                        help="one section (gemv: the batch-1 weight-only section of the cuda mode)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per measurement")
    parser.add_argument("--max-reps", type=int, default=30)
    parser.add_argument("--max-wait", type=float, default=1800.0, help="seconds to wait per shape for a quiet machine")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all methods (default 3, quick 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU kernels against cuBLAS/cuDNN fp16, bf16 and torch._int_mm "
                             "(benchmarks/cuda_kernels.py)")
    parser.add_argument("--calls", type=int, default=20, help="cuda: calls captured per CUDA graph")
    parser.add_argument("--packed-triton", action="store_true",
                        help="cuda: also time canonical weights on the opt-in Triton engine (QUANTKIT_CUDA_GEMM)")
    parser.add_argument("--replays", type=int, default=10, help="cuda: graph replays per round")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    suffix = "" if args.device == "cpu" else "-cuda"
    args.json = args.json or str(ROOT / "benchmarks" / "results" / f"kernels{suffix}.json")
    args.markdown = args.markdown or str(ROOT / "docs" / f"results-kernels{suffix}.md")
    if args.device == "cuda":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import cuda_kernels

        args.rounds = args.rounds or 5
        cuda_kernels.run(args)
        return 0
    if args.only == "gemv":
        parser.error("--only gemv is a section of --device cuda")
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 0.3
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if not native.load_native():
        print(f"quantkit native kernels are not loaded: {native.native_status()['error']}", file=sys.stderr)
        return 1
    torch.set_num_threads(2)
    notes = []
    if args.quanto:
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            args.quanto = False
            notes.append(
                "optimum-quanto not installed: its columns are omitted "
                "(`pip install optimum-quanto` adds them; it does not need another torch)."
            )
    if args.sdnq:
        try:
            import sdnq  # noqa: F401
        except ImportError:
            args.sdnq = False
            notes.append("sdnq not installed: its columns are omitted (`pip install sdnq` adds them).")
    lin = [s for s in LINEAR_SHAPES if not args.quick or s[1] in LINEAR_QUICK]
    cnv = [s for s in CONV_SHAPES if not args.quick or s[1] in CONV_QUICK]
    linear = bench_linear(lin, args) if args.only in (None, "linear") else []
    conv = bench_conv(cnv, args) if args.only in (None, "conv") else []
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "isa": native.cpu_features().get("isa"),
            "quick": args.quick,
            "rounds": args.rounds,
            "min_time": args.min_time,
            "commit": commit,
            "python": platform.python_version(),
            "notes": notes,
            "interference": INTERFERENCE,
        },
        "linear": linear,
        "conv": conv,
    }
    result["summary"] = summarize(linear, conv)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    md = markdown(result)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
