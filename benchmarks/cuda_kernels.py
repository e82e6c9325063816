"""CUDA mode of benchmarks/kernels.py: quantkit's GPU kernels against cuBLAS / cuDNN fp16 and bf16 and
``torch._int_mm`` on SDXL-size linear and convolution shapes at 1024x1024.

Every method is timed the same way: ``--calls`` calls captured in one CUDA graph (so Python and launch overheads,
which deployment removes with CUDA graphs or torch.compile, do not count), the graph replayed ``--replays``
times; the median of ``--rounds`` rounds, per call. Writes JSON and a Markdown table (ratios = fp16 time / method
time, so > 1 is faster than fp16).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

# (layer, M, K, N): SDXL UNet at 1024x1024 (latent 128x128: attention at 64x64 = 4096 and 32x32 = 1024 tokens).
LINEAR_SHAPES = [
    ("attn proj 64x64", 4096, 640, 640),
    ("ff.proj (GEGLU) 64x64", 4096, 640, 5120),
    ("ff.out 64x64", 4096, 2560, 640),
    ("attn proj 32x32", 1024, 1280, 1280),
    ("ff.proj (GEGLU) 32x32", 1024, 1280, 10240),
    ("ff.out 32x32", 1024, 5120, 1280),
    ("attn2 to_k (text)", 77, 2048, 1280),
    ("time_emb linear", 1, 1280, 1280),
    ("add_embedding", 1, 2816, 1280),
    ("ff.proj at M=1", 1, 1280, 10240),
    ("ff.out at M=1", 1, 5120, 1280),
]
# (layer, C, H, W, O, kernel, stride, padding)
CONV_SHAPES = [
    ("resnet conv 128x128", 320, 128, 128, 320, 3, 1, 1),
    ("downsample 128->64", 320, 128, 128, 320, 3, 2, 1),
    ("resnet conv 64x64", 640, 64, 64, 640, 3, 1, 1),
    ("resnet conv 32x32", 1280, 32, 32, 1280, 3, 1, 1),
    ("conv_shortcut 1x1 64x64", 320, 64, 64, 640, 1, 1, 0),
]


def graph_time(fn, calls: int, replays: int, rounds: int) -> float:
    """Median seconds per call of ``fn`` captured ``calls`` times in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (replays * calls))
    del graph
    return statistics.median(times)


# (layer, K, N) of the batch-1 GEMV section: SDXL's linears at M = 1 (time / added embeddings, and the largest
# transformer weights as a text-encoder-like or batch-1 decode would see them).
GEMV_SHAPES = [
    ("time_emb linear", 1280, 1280),
    ("add_embedding", 2816, 1280),
    ("attn proj 64x64", 640, 640),
    ("ff.proj (GEGLU) 64x64", 640, 5120),
    ("ff.out 32x32", 5120, 1280),
    ("ff.proj (GEGLU) 32x32", 1280, 10240),
    ("T5-XXL ff.wi (PixArt text encoder)", 4096, 10240),  # a large layer: the bandwidth-bound regime
    ("Flux-size ff.out", 12288, 3072),
]


def _packed(out_f, in_f, bits, group_size=-1, kernel=None, device="cuda"):
    from quantkit.formats import WeightFormat, pack, quantize_weight

    shape = (out_f, in_f) if kernel is None else (out_f, in_f, kernel, kernel)
    w = torch.randn(shape, device=device) / in_f ** 0.5
    codes, scale, zp = quantize_weight(w, WeightFormat(bits, group_size))
    return pack(codes, bits), scale, zp


def _static(device="cuda"):
    from quantkit.ops import reference

    s, zp = reference.act_qparams_from_range(torch.tensor(-4.0), torch.tensor(4.0), 8)
    return s.reshape(1).to(device), zp.reshape(1).to(device)


def _resident(qdata, zp, bits, k, conv_shape=None):
    """The GPU-resident blob of a canonical weight (what quantkit.compact makes of a CUDA layer)."""
    from quantkit.ops import resident

    return resident.make(qdata, zp, bits, k, conv_shape)


def _on_engine(name, fn):
    """``fn`` with the CUDA integer linears on GEMM engine ``name`` (src/quantkit/ops/cuda.py)."""
    from quantkit.ops import cuda

    def call():
        previous = cuda.set_gemm_engine(name)
        try:
            return fn()
        finally:
            cuda.set_gemm_engine(previous)
    return call


def _with_env(env: dict, fn):
    """``fn`` called with the environment variables ``env`` set (kernel choices read at call time)."""
    def call():
        previous = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for name, value in previous.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
    return call


def _cutlass_ok(m, n, k, a8, s) -> bool:
    """Whether the opt-in CUTLASS engine can time this shape: its library loads (or builds) and it takes the shape;
    a failure to load is printed once and the engine left out."""
    from quantkit.ops import cutlass_gemm

    if not cutlass_gemm.supported(m, n, k, a8, s, torch.float16):
        return False
    try:
        cutlass_gemm.library()
    except Exception as exc:  # no headers / nvcc / library: the other methods still run
        if not getattr(_cutlass_ok, "warned", False):
            print(f"  CUTLASS engine not timed: {exc}", flush=True)
            _cutlass_ok.warned = True
        return False
    return True


def _w4_tma(a8, blob, w_scale, s, zp, b, m, n, k):
    """A resident 4-bit linear on the copy-engine kernel, which the dispatch keeps for 8-bit weights."""
    from quantkit.ops import triton_gemm

    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    ws, wzp = triton_gemm._resident_args(blob, None, w_scale, 4, k)
    flags = dict(W_BITS=4, HAS_WZP=False, PER_ROW=False, HAS_BIAS=True, enable_fp_fusion=False)
    triton_gemm._launch_resident_tma(a8, blob, ws, wzp, y, w_scale, s, zp, b, m, n, k, 4, flags)
    return y


def bench_linear(args) -> list[dict]:
    """SDXL linears: ``w8a8`` / ``w4a8`` with canonical weights (cuBLASLt), ``*_resident`` with GPU-resident ones
    (quantkit.compact: Triton), ``*_triton`` (``--packed-triton``) canonical weights on the opt-in Triton engine."""
    from quantkit.ops import triton_gemm

    ops = torch.ops.quantkit
    rows = []
    s, zp = _static()
    for layer, m, k, n in LINEAR_SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        xb, wb = x.bfloat16(), w16.bfloat16()
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        q8, s8, _ = _packed(n, k, 8)
        q4, s4, _ = _packed(n, k, 4)
        q4g, s4g, _ = _packed(n, k, 4, 64)
        methods = {
            "fp16": lambda: F.linear(x, w16, b),
            "bf16": lambda: F.linear(xb, wb, b.bfloat16()),
            "w8a8": lambda: ops.gemm_w8a8(x, q8, s8, None, b, s, zp, 8, -1, 8),
            "w8a8_dynamic": lambda: ops.gemm_w8a8(x, q8, s8, None, b, None, None, 8, -1, 8),
            "w4a8": lambda: ops.gemm_w4a8(x, q4, s4, None, b, s, zp, 4, -1, 8),
            "w4a16_g64": lambda: ops.gemm_w4a16(x, q4g, s4g, None, b, None, None, 4, 64, 16),
        }
        if triton_gemm.available():
            r8, r4 = _resident(q8, None, 8, k), _resident(q4, None, 4, k)
            a8 = torch.ops.quantkit_cuda.quantize_act_s8(x, s, zp, 8)
            methods["w8a8_resident"] = lambda: ops.gemm_w8a8(x, r8, s8, None, b, s, zp, 8, -1, 8)
            methods["w4a8_resident"] = lambda: ops.gemm_w4a8(x, r4, s4, None, b, s, zp, 4, -1, 8)
            methods["w8a8_resident (GEMM only)"] = lambda: triton_gemm.resident_linear(a8, r8, None, s8, s, zp, b, 8,
                                                                                      torch.float16)
            methods["w4a8_resident (GEMM only)"] = lambda: triton_gemm.resident_linear(a8, r4, None, s4, s, zp, b, 4,
                                                                                      torch.float16)
            if triton_gemm._tma_aligned(m, n, k, a8, torch.float16):  # each 4-bit kernel forced (default: by rows)
                for engine in ("swap", "pointer"):
                    methods[f"w4a8_resident_{engine} (GEMM only)"] = _with_env(
                        {"QUANTKIT_TRITON_W4": engine},
                        lambda: triton_gemm.resident_linear(a8, r4, None, s4, s, zp, b, 4, torch.float16))
                    assert torch.equal(methods["w4a8_resident (GEMM only)"](),
                                       methods[f"w4a8_resident_{engine} (GEMM only)"]())
            if triton_gemm.tma_supported(m, n, k, a8, torch.float16):
                # side by side: 8-bit on the pointer kernel (QUANTKIT_TRITON_TMA=0), 4-bit on the copy-engine one
                methods["w8a8_resident_ptr (GEMM only)"] = _with_env(
                    {"QUANTKIT_TRITON_TMA": "0", "QUANTKIT_INT8_GEMM": "triton"},
                    lambda: triton_gemm.resident_linear(a8, r8, None, s8, s, zp, b, 8, torch.float16))
                methods["w4a8_resident_tma (GEMM only)"] = lambda: _w4_tma(a8, r4, s4, s, zp, b, m, n, k)
                assert torch.equal(methods["w8a8_resident (GEMM only)"](), methods["w8a8_resident_ptr (GEMM only)"]())
                assert torch.equal(methods["w4a8_resident (GEMM only)"](), methods["w4a8_resident_tma (GEMM only)"]())
            # 8-bit on the Triton copy-engine kernel (the default elsewhere than Hopper with the CUTLASS library)
            methods["w8a8_resident_triton (GEMM only)"] = _with_env(
                {"QUANTKIT_INT8_GEMM": "triton"},
                lambda: triton_gemm.resident_linear(a8, r8, None, s8, s, zp, b, 8, torch.float16))
            if _cutlass_ok(m, n, k, a8, s):  # the CUTLASS engine (quantkit.ops.cutlass_gemm), each config forced
                from quantkit.ops import cutlass_gemm

                for cfg in cutlass_gemm.CONFIGS:
                    methods[f"w8a8_resident_cutlass{cfg} (GEMM only)"] = _with_env(
                        {"QUANTKIT_INT8_GEMM": "cutlass", "QUANTKIT_CUTLASS_CONFIG": str(cfg)},
                        lambda: triton_gemm.resident_linear(a8, r8, None, s8, s, zp, b, 8, torch.float16))
                    assert torch.equal(methods["w8a8_resident_triton (GEMM only)"](),
                                       methods[f"w8a8_resident_cutlass{cfg} (GEMM only)"]()), f"{layer}: CUTLASS {cfg}"
                print(f"  {layer}: CUTLASS config {cutlass_gemm.config_of(m)} by default", flush=True)
                from quantkit.ops import resident

                s4blob = resident.make(q4, None, 4, k, signed=True)  # QUANTKIT_RESIDENT_W4=cutlass: int4 x int8
                if cutlass_gemm.w4_supported(m, n, k, a8, s4blob, s, torch.float16):
                    methods["w4a8_resident_cutlass (GEMM only)"] = lambda: triton_gemm.resident_linear(
                        a8, s4blob, None, s4, s, zp, b, 4, torch.float16)
                    assert torch.equal(methods["w4a8_resident (GEMM only)"](),
                                       methods["w4a8_resident_cutlass (GEMM only)"]()), f"{layer}: CUTLASS W4A8"
            if args.packed_triton:
                methods["w8a8_triton"] = _on_engine(
                    "triton", lambda: ops.gemm_w8a8(x, q8, s8, None, b, s, zp, 8, -1, 8))
                methods["w4a8_triton"] = _on_engine(
                    "triton", lambda: ops.gemm_w4a8(x, q4, s4, None, b, s, zp, 4, -1, 8))
            for name in ("w8a8", "w4a8"):  # every engine and layout agrees bit for bit
                for other in (f"{name}_resident", f"{name}_triton"):
                    if other in methods:
                        assert torch.equal(methods[name](), methods[other]()), f"{layer}: {other} differs from {name}"
        if m > 16:
            xi = torch.randint(-128, 127, (m, k), device="cuda", dtype=torch.int8)
            wi = torch.randint(-128, 127, (n, k), device="cuda", dtype=torch.int8)
            methods["torch_int_mm (GEMM only)"] = lambda: torch._int_mm(xi, wi.t())
        secs = {name: graph_time(fn, args.calls, args.replays, args.rounds) for name, fn in methods.items()}
        row = {"layer": layer, "M": m, "K": k, "N": n, "us": {k_: v * 1e6 for k_, v in secs.items()},
               "speedup_vs_fp16": {k_: secs["fp16"] / v for k_, v in secs.items()}}
        rows.append(row)
        print(f"  linear {layer:24s} M={m:<5d} K={k:<5d} N={n:<6d} fp16={row['us']['fp16']:.1f}us " +
              " ".join(f"{k_}={v:.2f}x" for k_, v in row["speedup_vs_fp16"].items() if k_ != "fp16"), flush=True)
    return rows


def _cycle(fns):
    """One function calling ``fns`` in turn (each CUDA-graph capture of it records the next one)."""
    state = {"i": -1}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()
    return call


def bench_gemv(args) -> list[dict]:
    """Batch-1 linears (M = 1): fp16 cuBLAS against the 4-bit weight-only GEMV, weights warm (one copy, resident
    in L2 across calls) and cold (copies cycled so that the weights read per round exceed 3x the L2: every call
    reads its weights from HBM, as in a UNet step where each layer's weights are read once)."""
    ops = torch.ops.quantkit
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for layer, k, n in GEMV_SHAPES:
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        copies16 = max(1, -(-3 * l2 // (2 * n * k)))
        copies4 = max(1, -(-3 * l2 // (n * k // 2)))
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5 for _ in range(copies16)]
        q4g = [_packed(n, k, 4, 64) for _ in range(copies4)]
        q4c = [_packed(n, k, 4) for _ in range(copies4)]

        def fp16(w):
            return lambda: F.linear(x, w, b)

        def w4(q, gs):
            return lambda: ops.gemm_w4a16(x, q[0], q[1], None, b, None, None, 4, gs, 16)

        methods = {
            "fp16": [fp16(w) for w in w16],
            "w4a16_g64": [w4(q, 64) for q in q4g],
            "w4a16_channel": [w4(q, -1) for q in q4c],
            # each GEMV kernel forced (the default: tc for fp16 with N >= 4096, else v3 up to 4M codes, v2 above)
            "w4a16_g64_v2": [_with_env("QUANTKIT_GEMV", "v2", w4(q, 64)) for q in q4g],
            "w4a16_g64_v3": [_with_env("QUANTKIT_GEMV", "v3", w4(q, 64)) for q in q4g],
            "w4a16_g64_tc": [_with_env("QUANTKIT_GEMV", "tc", w4(q, 64)) for q in q4g],
            "w4a16_channel_tc": [_with_env("QUANTKIT_GEMV", "tc", w4(q, -1)) for q in q4c],
            # Not a GEMV: torch's amax over the packed 4-bit codes, how fast a generic one-launch reduction reads
            # these weights (on an H100: 10.5 us at 4096x10240 where tc took 11.9; a reference point, not a bound,
            # since it costs more than the GEMVs on small weights, 6.8 us at 1280x1280)
            "w4_codes_read_floor": [(lambda t: lambda: t.amax())(q[0]) for q in q4g],
        }
        us = {}
        for name, fns in methods.items():
            us[f"{name}_warm"] = graph_time(fns[0], args.calls, args.replays, args.rounds) * 1e6
            calls = max(args.calls, len(fns))
            us[f"{name}_cold"] = graph_time(_cycle(fns), calls, args.replays, args.rounds) * 1e6
        speed = {}
        for temp in ("warm", "cold"):
            for name in methods:
                speed[f"{name}_{temp}"] = us[f"fp16_{temp}"] / us[f"{name}_{temp}"]
        row = {"layer": layer, "M": 1, "K": k, "N": n, "us": us, "speedup_vs_fp16": speed,
               "copies": {"fp16": copies16, "w4": copies4}}
        rows.append(row)
        print(f"  gemv {layer:24s} K={k:<5d} N={n:<6d} " +
              " ".join(f"{k_}={v:.1f}us" for k_, v in us.items()) + " | " +
              " ".join(f"{k_}={v:.2f}x" for k_, v in speed.items() if not k_.startswith("fp16")), flush=True)
    return rows


def bench_conv(args) -> list[dict]:
    from quantkit.ops import triton_gemm

    ops = torch.ops.quantkit
    rows = []
    s, zp = _static()
    for layer, c, h, w, o, kk, st, pad in CONV_SHAPES:
        x = torch.randn(1, c, h, w, device="cuda", dtype=torch.float16)
        xcl = x.to(memory_format=torch.channels_last)
        w16 = torch.randn(o, c, kk, kk, device="cuda", dtype=torch.float16) / (c * kk * kk) ** 0.5
        wcl = w16.to(memory_format=torch.channels_last)
        b = torch.randn(o, device="cuda", dtype=torch.float16)
        q8, s8, _ = _packed(o, c, 8, kernel=kk)
        q4, s4, _ = _packed(o, c, 4, kernel=kk)
        geo = ([kk, kk], [st, st], [pad, pad], [1, 1])
        methods = {
            "fp16": lambda: F.conv2d(x, w16, b, st, pad),
            "fp16_channels_last": lambda: F.conv2d(xcl, wcl, b, st, pad),
            "w8a8": lambda: ops.conv2d_w8a8(x, q8, s8, None, b, s, zp, 8, -1, 8, *geo),
            "w4a8": lambda: ops.conv2d_w4a8(x, q4, s4, None, b, s, zp, 4, -1, 8, *geo),
            "w4a16": lambda: ops.conv2d_w4a16(x, q4, s4, None, b, None, None, 4, -1, 16, *geo),
        }
        if triton_gemm.available():
            from quantkit.ops import resident

            for bits, q_, sc in ((8, q8, s8), (4, q4, s4)):
                if resident.layout_supported(bits, True, True, (c, kk, kk)):
                    blob = _resident(q_, None, bits, c * kk * kk, (c, kk, kk))
                    op = ops.conv2d_w8a8 if bits == 8 else ops.conv2d_w4a8
                    fn = (lambda op_, blob_, sc_, bits_:
                          lambda: op_(x, blob_, sc_, None, b, s, zp, bits_, -1, 8, *geo))(op, blob, sc, bits)
                    methods[f"w{bits}a8_resident"] = fn
                    assert torch.equal(fn(), methods[f"w{bits}a8"]()), f"{layer}: w{bits}a8_resident differs"
                    ho = (h + 2 * pad - kk) // st + 1
                    wo = (w + 2 * pad - kk) // st + 1
                    probe = torch.empty(1, h, w, c, dtype=torch.int8, device="cuda")
                    tma_ok = _with_env("QUANTKIT_TRITON_CONV_TMA", "1", lambda: triton_gemm.conv_tma_supported(
                        probe, o, bits, (kk, kk), (st, st), (pad, pad), (1, 1), ho, wo, torch.float16))()
                    if tma_ok:  # the default takes the copy-engine convolution: the pointer kernel beside it
                        methods[f"w{bits}a8_resident_ptr"] = _with_env("QUANTKIT_TRITON_CONV_TMA", "0", fn)
                        assert torch.equal(methods[f"w{bits}a8_resident_ptr"](), methods[f"w{bits}a8"]()), layer
        secs = {name: graph_time(fn, args.calls, args.replays, args.rounds) for name, fn in methods.items()}
        row = {"layer": layer, "C": c, "H": h, "W": w, "O": o, "kernel": kk, "stride": st,
               "us": {k_: v * 1e6 for k_, v in secs.items()},
               "speedup_vs_fp16": {k_: secs["fp16"] / v for k_, v in secs.items()}}
        rows.append(row)
        print(f"  conv {layer:26s} fp16={row['us']['fp16']:.1f}us " +
              " ".join(f"{k_}={v:.2f}x" for k_, v in row["speedup_vs_fp16"].items() if k_ != "fp16"), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"CUDA kernels on {result['device']} (torch {result['torch']}), per-call times from CUDA graphs; "
             "ratio = fp16 time / method time.", ""]
    if result.get("gemv"):
        lines += ["Batch-1 linears (M = 1), fp16 cuBLAS vs the 4-bit weight-only GEMV; warm = one weight copy "
                  "(L2-resident), cold = copies cycled past 3x the L2 (weights from HBM); ratio = fp16 / method.", "",
                  "| layer | K | N | fp16 warm (us) | w4a16 g64 warm | w4a16/ch warm | fp16 cold (us) | "
                  "w4a16 g64 cold | w4a16/ch cold |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["gemv"]:
            sp, us = r["speedup_vs_fp16"], r["us"]
            lines.append(f"| {r['layer']} | {r['K']} | {r['N']} | {us['fp16_warm']:.1f} | "
                         f"{sp['w4a16_g64_warm']:.2f}x | {sp['w4a16_channel_warm']:.2f}x | {us['fp16_cold']:.1f} | "
                         f"{sp['w4a16_g64_cold']:.2f}x | {sp['w4a16_channel_cold']:.2f}x |")
        lines.append("")
    for kind in ("linear", "conv"):
        rows = result.get(kind, [])
        if not rows:
            continue
        methods = [k for k in rows[0]["speedup_vs_fp16"]]
        for r in rows:  # union, in first-seen order
            methods += [k for k in r["speedup_vs_fp16"] if k not in methods]
        head = "| layer | shape | fp16 (us) | " + " | ".join(m for m in methods if m != "fp16") + " |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            shape = (f"M={r['M']} K={r['K']} N={r['N']}" if kind == "linear"
                     else f"{r['C']}->{r['O']} {r['kernel']}x{r['kernel']}/s{r['stride']} @{r['H']}x{r['W']}")
            cells = [f"{r['speedup_vs_fp16'][m]:.2f}x" if m in r["speedup_vs_fp16"] else "-"
                     for m in methods if m != "fp16"]
            lines.append(f"| {r['layer']} | {shape} | {r['us']['fp16']:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run(args) -> dict:
    import quantkit.ops

    status = quantkit.ops.cuda_status()
    if not torch.cuda.is_available() or not status["loaded"]:
        raise SystemExit(f"CUDA mode needs a GPU and the quantkit CUDA kernels ({status['error']})")
    torch.manual_seed(0)
    from quantkit.ops import triton_gemm

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton_engine": triton_gemm.available(),
              "timing": f"CUDA graph of {args.calls} calls x {args.replays} replays, median of {args.rounds}"}
    if args.only in (None, "gemv"):
        result["gemv"] = bench_gemv(args)
    if args.only in (None, "linear"):
        result["linear"] = bench_linear(args)
    if args.only in (None, "conv"):
        result["conv"] = bench_conv(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    md = markdown(result)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(md + "\n")
    print(md)
    return result
