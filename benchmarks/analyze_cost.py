"""Cost of the sensitivity analysis per layer on a full-size denoiser with random weights.

    python benchmarks/analyze_cost.py probe    [--arch sd-turbo] [--latent 32] [--layers N | --fqn NAME ...]
    python benchmarks/analyze_cost.py pipeline [--arch sd-turbo] [--latent 32] [--fqn NAME ...] [--fresh]
    torchrun --nproc-per-node 2 benchmarks/analyze_cost.py pipeline ...       # the same, sharded over 2 ranks

Both write their section of ``benchmarks/results/analyze_cost.json`` (``--out``), keeping the other one.

``probe``: the full-size UNet alone and one synthetic calibration step (latent ``[1, 4, latent, latent]``,
timestep 999, text embedding ``[1, 77, cross_attention_dim]`` with an outlier first token as CLIP's BOS); the
chosen layers' inputs are observed with the calibration observers, then the analysis code itself
(:class:`~quantkit.sensitivity.probe.SensitivityProbe`, the work items, the on-disk cache and the table builder of
``quantkit analyze``) measures quality-layer SQNR at weights {4, 8} and activations {4, 8}. A second pass through
the cache shows a cached re-run costs zero evaluations; the mean cost is extrapolated to every quality layer.

``pipeline``: :func:`quantkit.sensitivity.analyze.analyze` end to end, unchanged, on a pipeline whose UNet is
the full-size one (the tiny SD pipeline's VAE and tokenizer, and a one-layer random text encoder of the UNet's
cross-attention width, keep the rest cheap): calibration, SQNR for quality layers and SSIM of generated images
for content layers, caching, and (under torchrun) sharding. It runs twice; the second run must do no work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from quantkit.calibrate.artifact import CalibrationArtifact
from quantkit.calibrate.observers import OBSERVERS
from quantkit.config import parse_config
from quantkit.models.architectures import build_denoiser
from quantkit.models.layers import find_layers
from quantkit.sensitivity.analyze import AnalysisSettings, analyze, build_table, work_items
from quantkit.sensitivity.cache import MeasurementCache
from quantkit.sensitivity.distributed import init_distributed
from quantkit.sensitivity.probe import SensitivityProbe

# A spread of quality layers: the first and last convs, the time embedding, a ResNet conv at each resolution,
# self-attention projections and a transformer projection at the deepest level.
DEFAULT_LAYERS = [
    "conv_in",
    "time_embedding.linear_1",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.resnets.1.conv2",
    "mid_block.attentions.0.proj_in",
    "mid_block.resnets.0.conv1",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "conv_out",
]


# For the pipeline mode: two quality layers and two content layers (a BOS-aware text projection and a
# feed-forward output), judged by SQNR and by SSIM respectively.
PIPELINE_LAYERS = [
    "conv_in",
    "mid_block.resnets.0.conv1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
]


def synthetic_step(denoiser, latent: int, seed: int = 0) -> dict:
    """One denoiser call's inputs, as calibration records them (``args``, ``kwargs``)."""
    g = torch.Generator().manual_seed(seed)
    cfg = denoiser.config
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    text[:, 0] = 20.0 * torch.randn(cfg.cross_attention_dim, generator=g)  # BOS-like outlier token
    sample = torch.randn(1, cfg.in_channels, latent, latent, generator=g)
    return {"args": [sample, torch.tensor(999)], "kwargs": {"encoder_hidden_states": text, "return_dict": False}}


@torch.inference_mode()
def calibrate_synthetic(denoiser, step: dict, fqns: list[str]) -> CalibrationArtifact:
    """Record the FP output and observe the layers' inputs with the calibration observers (one step)."""
    observers, handles = {}, []
    for fqn in fqns:
        module = denoiser.get_submodule(fqn)
        obs = observers[fqn] = OBSERVERS["minmax"](channel_dim=1 if isinstance(module, torch.nn.Conv2d) else -1)
        handles.append(module.register_forward_pre_hook(lambda m, a, obs=obs: obs.update(a[0])))
    t0 = time.perf_counter()
    out = denoiser(*step["args"], **step["kwargs"])[0]
    seconds = time.perf_counter() - t0
    for h in handles:
        h.remove()
    stats = {fqn: obs.state() for fqn, obs in observers.items()}
    return CalibrationArtifact(stats=stats, steps=[{**step, "output": out}],
                               manifest={"fingerprint": "synthetic", "fp_evaluation_seconds": round(seconds, 3)})


def run_probe(args) -> dict:
    """The ``probe`` mode: quality-layer SQNR on the bare UNet with a synthetic calibration step."""
    t0 = time.perf_counter()
    denoiser = build_denoiser(args.arch).eval()
    build_s = time.perf_counter() - t0
    all_layers = find_layers(denoiser)
    by_name = {la.fqn: la for la in all_layers}
    fqns = args.fqn or DEFAULT_LAYERS
    fqns = fqns[:args.layers] if args.layers else fqns
    missing = [f for f in fqns if f not in by_name]
    if missing:
        raise SystemExit(f"not layers of {args.arch}: {missing}")
    layers = [by_name[f] for f in fqns]
    # The quality metric (SQNR) and the quality candidates for every chosen layer, whatever its group.
    settings = AnalysisSettings(layers=fqns, content_metric="sqnr", quality_metric="sqnr",
                                weight_candidates={"content": [4, 8], "quality": [4, 8]},
                                act_candidates={"content": [4, 8], "quality": [4, 8]})
    step = synthetic_step(denoiser, args.latent)
    art = calibrate_synthetic(denoiser, step, fqns)
    items = work_items(layers, settings)
    with tempfile.TemporaryDirectory() as tmp:
        cache = MeasurementCache(Path(tmp), f"bench-{args.arch}-{args.latent}")
        passes = []
        with SensitivityProbe(denoiser, art) as probe:
            sizes = probe.layer_sizes(fqns)
            for _ in range(2):  # the second pass finds everything in the cache
                e0, p0 = probe.evaluations, time.perf_counter()
                measures, _ = cache.load()
                pending = [it for it in items if it.key not in measures]
                if pending:
                    probe.prepare_sqnr_reference()
                for it in pending:
                    rec = {"record": "measure", "fqn": it.fqn, "kind": it.kind, "bits": it.bits,
                           "metric": it.metric, **probe.measure(it)}
                    cache.append(rec)
                    print(f"{it.fqn:64s} {it.kind[0].upper()}{it.bits}  {rec['value']:7.2f} dB  "
                          f"{rec['evaluations']} eval  {rec['seconds']:6.2f} s", flush=True)
                passes.append({"items": len(items), "computed": len(pending),
                               "evaluations": probe.evaluations - e0,
                               "seconds": round(time.perf_counter() - p0, 3)})
        measures, _ = cache.load()
    table = build_table(layers, items, measures, sizes, settings=settings.model_dump(mode="json"), cost={})
    per_item_s = sum(float(measures[it.key]["seconds"]) for it in items) / len(items)
    n_content = sum(la.role == "content" for la in all_layers)
    full_quality_items = 4 * (len(all_layers) - n_content)  # MixDQ: 2 weight + 2 activation candidates
    return {
        "arch": args.arch,
        "parameters": sum(p.numel() for p in denoiser.parameters()),
        "quantizable_layers": len(all_layers),
        "content_layers": n_content,
        "quality_layers": len(all_layers) - n_content,
        "latent": [1, 4, args.latent, args.latent],
        "encoder_hidden_states": list(step["kwargs"]["encoder_hidden_states"].shape),
        "recorded_steps": 1,
        **_machine(),
        "build_seconds": round(build_s, 1),
        "fp_evaluation_seconds": art.manifest["fp_evaluation_seconds"],
        "layers": table["layers"],
        "passes": passes,
        "seconds_per_item_mean": round(per_item_s, 3),
        "evaluations_per_item": 1,
        "extrapolated_quality_pass": {
            "items": full_quality_items, "evaluations": full_quality_items,
            "hours_on_this_machine": round(full_quality_items * per_item_s / 3600, 2),
            "note": "SQNR items of every quality layer at this latent size and 1 recorded step; the SQNR pass "
                    "scales linearly with the recorded steps",
        },
    }


def hybrid_pipeline(arch: str):
    """The tiny SD pipeline with the full-size UNet and a random one-layer text encoder of the UNet's width."""
    from transformers import CLIPTextModel

    from quantkit.models.pipeline import load_fp_pipeline

    pipe = load_fp_pipeline("builtin:tiny-sd")
    unet = build_denoiser(arch).eval()  # seeded: every rank builds the same weights
    text_cfg = pipe.text_encoder.config
    text_cfg.hidden_size, text_cfg.intermediate_size = unet.config.cross_attention_dim, 128
    text_cfg.num_hidden_layers, text_cfg.num_attention_heads = 1, 8
    torch.manual_seed(1)
    pipe.unet, pipe.text_encoder = unet, CLIPTextModel(text_cfg).eval()
    return pipe


def run_pipeline(args) -> dict | None:
    """The ``pipeline`` mode: ``analyze()`` end to end (twice) on the hybrid pipeline; rank 0 returns results."""
    rank = int(os.environ.get("RANK", "0"))
    workdir = Path(args.workdir or f"{tempfile.gettempdir()}/quantkit-analyze-cost-{args.arch}")
    if args.fresh and rank == 0 and workdir.exists():
        shutil.rmtree(workdir)  # other ranks touch the workdir only after analyze()'s first barrier
    fqns = args.fqn or PIPELINE_LAYERS
    pixels = 2 * args.latent  # the tiny VAE downsamples by 2
    config = parse_config({
        "model": "builtin:tiny-sd",
        "quantization": {"targets": fqns},  # calibration observes only these layers
        "calibration": {"num_prompts": 2, "num_inference_steps": 1, "batch_size": 2, "height": pixels,
                        "width": pixels},
    })
    t0 = time.perf_counter()
    pipe = hybrid_pipeline(args.arch)
    build_s = time.perf_counter() - t0
    runs = []
    ctx = init_distributed()  # joined once here, so that both analyze() calls reuse the same process group
    try:
        for _ in range(2):  # the second run finds everything in the cache
            t0 = time.perf_counter()
            path = analyze(config, workdir, {"layers": fqns}, pipe=pipe, progress=rank == 0)
            wall = round(time.perf_counter() - t0, 2)
            if rank == 0:
                table = json.loads(path.read_text())
                runs.append({"wall_seconds": wall, **table["cost"]})
    finally:
        ctx.close()
    if rank != 0:
        return None
    return {
        "arch": args.arch,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "image": [pixels, pixels],
        "latent": [2, 4, args.latent, args.latent],
        "prompts": 2, "steps": 1,
        **_machine(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "build_seconds": round(build_s, 1),
        "runs": runs,  # the first run (calibration included in wall_seconds), then the cached re-run
        "layers": table["layers"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["probe", "pipeline"])
    ap.add_argument("--arch", default="sd-turbo")
    ap.add_argument("--latent", type=int, default=32, help="latent height = width (32: 256 px for SD's VAE)")
    ap.add_argument("--fqn", action="append", help="a layer to analyse (repeatable; default: a fixed spread)")
    ap.add_argument("--layers", type=int, help="probe: analyse only the first N of the chosen layers")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--workdir", help="pipeline: the analysis workdir (shared by the ranks)")
    ap.add_argument("--fresh", action="store_true", help="pipeline: delete the workdir first")
    ap.add_argument("--out", default="benchmarks/results/analyze_cost.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_probe(args) if args.mode == "probe" else run_pipeline(args)
    if result is None:
        return
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    key = args.mode if args.mode == "probe" else f"pipeline_{result['world_size']}proc"
    data[key] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))


def _machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "native_kernels": _native()}


def _native() -> bool:
    from quantkit.ops import native

    return bool(getattr(native, "native_status", lambda: {})().get("loaded"))


if __name__ == "__main__":
    main()
