"""``quantkit bench``: denoiser step time and memory of pipelines on this machine, FP against its exports.

Each pipeline is measured in a process of its own (``python -m quantkit.bench JOB``), so its memory figures are its
own and one pipeline's caches cannot speed up another. In that process the pipeline is loaded as a user loads it
(``load_pipeline`` for a quantkit export: compacted kernel layouts on the CPU, the resident layout on a Hopper GPU,
the fusions at the first GPU call), run once on the prompt to capture the denoiser's real inputs at the first
sampling step, then the denoiser alone is called ``warmup`` times and timed over ``steps`` calls.

Reported per pipeline: the median step time with its quartiles and the speed-up against the first (FP) pipeline,
and memory: on the CPU the resident set after loading and its peak over the timed steps (VmHWM, reset before the
steps; the whole pipeline, text encoder and VAE included); on a GPU the allocated memory after loading and the peak
over the steps. Timings on shared machines are noisy: compare pipelines measured in one call, and read the quartiles.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quantkit.errors import QuantkitError

__all__ = ["bench", "markdown_table", "peak_rss_mib", "reset_peak_rss", "rss_mib"]

DTYPES = ("float32", "float16", "bfloat16")


def _proc_status(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """Resident memory of this process now (MiB; Linux), else None."""
    return _proc_status("VmRSS")


def reset_peak_rss() -> None:
    """Free what is freeable and restart the kernel's peak-RSS counter (VmHWM) at the current resident size."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (VmHWM), else the process's lifetime peak."""
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(job: dict) -> dict:
    """Runs in the child process: load, capture the denoiser's inputs, time it; returns the measurements."""
    import torch

    from quantkit.evaluate import load_any_pipeline
    from quantkit.models.pipeline import denoiser_of, generate

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"]) if job["dtype"] else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    pipe = load_any_pipeline(job["spec"], device, torch_dtype=dtype)
    load_s = time.perf_counter() - t0
    _, denoiser = denoiser_of(pipe)
    captured: dict = {}

    def capture(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = denoiser.register_forward_pre_hook(capture, with_kwargs=True)
    try:  # the first call also triggers what a loaded export does at its first GPU call (the fusions)
        generate(pipe, [job["prompt"]] * job["batch_size"], 1, job["guidance_scale"], 0, job["height"],
                 job["width"], output_type="latent")
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() >= 3), None)
    out = {"load_seconds": round(load_s, 3), "denoiser_batch": None if first is None else int(first.shape[0])}
    with torch.inference_mode():
        for _ in range(job["warmup"]):
            denoiser(*args, **kwargs)
        sync()
        if device.type == "cuda":
            out["allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        else:
            out["rss_mib"] = rss_mib()
            reset_peak_rss()
        times = []
        for _ in range(job["steps"]):
            t = time.perf_counter()
            denoiser(*args, **kwargs)
            sync()
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mib"] = peak_rss_mib()
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    out.update(step_ms=statistics.median(times) * 1e3, step_ms_quartiles=[q[0] * 1e3, q[2] * 1e3],
               steps=len(times))
    return out


def _run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "quantkit.bench", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise QuantkitError(f"bench: measuring {job['spec']} failed: {tail}")
    res = json.loads(lines[-1])
    if "error" in res:
        raise QuantkitError(res["error"])
    return res


def bench(reference: str, quantized: list[str], out: str | Path | None = None, *, device: str | None = None,
          steps: int = 10, warmup: int = 2, batch_size: int = 1, height: int | None = None,
          width: int | None = None, guidance_scale: float | None = None, dtype: str | None = None,
          prompt: str = "a photograph of an astronaut riding a horse", threads: int | None = None,
          rounds: int = 1, labels: list[str] | None = None, overwrite: bool = False) -> dict:
    """Time one denoiser step and measure memory of the FP pipeline and each quantized one, each in its own process.

    Args:
        reference: the FP pipeline (folder, hub id or ``builtin:NAME``); speed-ups are against it.
        quantized: pipelines to compare (quantkit exports or any pipeline).
        out: folder for ``bench.json`` and ``table.md`` (nothing written when None).
        device: ``cpu``, ``cuda``, ``cuda:N``; None: the GPU when CUDA is available, else the CPU.
        steps, warmup: timed and untimed denoiser calls.
        batch_size: prompts per call (classifier-free guidance doubles the denoiser's batch).
        height, width: image size (default: the pipeline's).
        guidance_scale: as in sampling (None: the pipeline's default).
        dtype: ``float32``, ``float16`` or ``bfloat16`` to load every pipeline in (None: as stored).
        threads: torch CPU threads in each child (None: torch's default).
        rounds: measure every pipeline this many times, in alternating order (FP, Q1, Q2, then Q2, Q1, FP, ...), so
            that a machine whose speed drifts during the run does not favour one side; the step time reported is
            the median over the rounds' medians (each round's in ``rounds_step_ms``), memory the largest peak.
        labels: row names of the quantized pipelines (default: folder names).

    Returns:
        ``{"device", "torch", "machine", "settings", "pipelines": {label: measurements}}``.
    """
    from quantkit.io import atomic_output, check_output_free
    from quantkit.models.pipeline import resolve_device

    if not quantized:
        raise QuantkitError("give at least one --quantized pipeline to compare with the reference")
    if dtype is not None and dtype not in DTYPES:
        raise QuantkitError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out is not None:
        check_output_free(out, overwrite)
    dev = resolve_device(device)
    import torch

    labels = ["FP"] + (labels or [Path(q).name or q for q in quantized])
    if len(set(labels)) != len(labels):
        raise QuantkitError(f"pipeline labels must differ: {labels}")
    settings = {"steps": steps, "warmup": warmup, "batch_size": batch_size, "height": height, "width": width,
                "guidance_scale": guidance_scale, "dtype": dtype, "prompt": prompt, "threads": threads}
    results = {"device": str(dev), "torch": torch.__version__, "machine": platform.machine(),
               "cpu_threads": threads or torch.get_num_threads(), "settings": settings, "pipelines": {}}
    if dev.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(dev)
    from tqdm.auto import tqdm

    if rounds < 1:
        raise QuantkitError("rounds must be at least 1")
    settings["rounds"] = rounds
    order = list(zip([reference, *quantized], labels))
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    jobs = [pair for r in range(rounds) for pair in (order if r % 2 == 0 else order[::-1])]
    for spec, label in tqdm(jobs, desc="bench", unit="pipeline"):
        child = {k: v for k, v in settings.items() if k != "rounds"}
        runs[label].append(_run_child({"spec": spec, "device": str(dev), **child}))
    for spec, label in order:
        res = dict(runs[label][0])
        if rounds > 1:
            res["rounds_step_ms"] = [r["step_ms"] for r in runs[label]]
            res["step_ms"] = statistics.median(res["rounds_step_ms"])
            res["step_ms_quartiles"] = [min(r["step_ms_quartiles"][0] for r in runs[label]),
                                        max(r["step_ms_quartiles"][1] for r in runs[label])]
            res["peak_mib"] = max(r["peak_mib"] for r in runs[label])
        res["path"] = spec
        results["pipelines"][label] = res
    base = results["pipelines"]["FP"]
    for r in results["pipelines"].values():
        r["speedup_vs_fp"] = base["step_ms"] / r["step_ms"]
        r["peak_vs_fp"] = r["peak_mib"] / base["peak_mib"]
    if out is not None:
        with atomic_output(out, overwrite=overwrite) as tmp:
            (tmp / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
            (tmp / "table.md").write_text(markdown_table(results) + "\n")
    return results


def markdown_table(results: dict) -> str:
    """One row per pipeline: step time (median, quartiles), speed-up vs FP, memory and its ratio to FP."""
    gpu = results["device"].startswith("cuda")
    mem = "peak GPU memory over the steps (MiB)" if gpu else "peak RSS over the steps (MiB)"
    head = ["pipeline", "denoiser step (ms)", "quartiles (ms)", "speed-up vs FP", mem, "vs FP",
            "allocated after load (MiB)" if gpu else "RSS after load (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["pipelines"].items():
        after = r.get("allocated_mib") if gpu else r.get("rss_mib")
        q = r["step_ms_quartiles"]
        lines.append(f"| {name} | {r['step_ms']:.2f} | {q[0]:.2f}-{q[1]:.2f} | {r['speedup_vs_fp']:.2f}x | "
                     f"{r['peak_mib']:.0f} | {r['peak_vs_fp']:.2f}x | "
                     + ("-" if after is None else f"{after:.0f}") + " |")
    s = results["settings"]
    where = results.get("gpu") or f"{results['machine']} CPU, {results['cpu_threads']} threads"
    rounds = s.get("rounds", 1)
    lines.append(f"\n{where}, torch {results['torch']}; batch {s['batch_size']}, {s['steps']} timed steps after "
                 f"{s['warmup']} warm-up, each pipeline in its own process"
                 + (f"; median of {rounds} rounds in alternating order (quartiles: the widest of the rounds)."
                    if rounds > 1 else "."))
    return "\n".join(lines)


def _child_main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    try:
        res = _measure(job)
    except QuantkitError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
