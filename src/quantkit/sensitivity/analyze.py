"""``quantkit analyze``: MixDQ's metric-decoupled sensitivity analysis, one layer quantized at a time.

For every analysed layer and every candidate bit width, weights and activations separately, the layer alone
is quantized and the damage measured: SQNR (dB) of the denoiser output on the recorded calibration inputs for
*quality* layers, SSIM of the final images against the FP images for *content* layers (cross-attention and
feed-forward by default; groups and metrics are configurable). Results are cached line by line on disk, so an
interrupted run resumes where it stopped and a re-run with the same inputs does no work, and under
``torchrun --nproc-per-node N`` the work items are sharded over the ranks and merged into the same table.

Settings: :class:`~quantkit.sensitivity.settings.AnalysisSettings` (the config's future ``analysis:`` section).

Lifecycle:
    1. load the FP pipeline and the calibration (rank 0 calibrates if it is missing or stale);
    2. rank 0 measures layer sizes (one replayed step) and the FP reference images, cached;
    3. every rank measures its round-robin share of the uncached work items, one cache line each;
    4. rank 0 merges the cache files into ``<workdir>/analysis/sensitivity.json`` and ``sensitivity.png``.

Outputs (``<workdir>/analysis/``): ``sensitivity.json`` (see :func:`build_table`), ``sensitivity.png``, the
cache files ``cache-<fingerprint>[.rank<r>].jsonl`` and ``fp-images-<fingerprint>.safetensors``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from quantkit.calibrate.artifact import load_artifact
from quantkit.calibrate.runner import fingerprint as calibration_fingerprint
from quantkit.calibrate.runner import load_or_calibrate
from quantkit.config import QuantkitConfig
from quantkit.errors import QuantkitError
from quantkit.io import load_safetensors, write_json
from quantkit.models.layers import LayerInfo, check_pattern, find_layers, match, select_layers
from quantkit.models.pipeline import denoiser_of, load_fp_pipeline, resolve_device
from quantkit.sensitivity.cache import MeasurementCache, fingerprint_of
from quantkit.sensitivity.distributed import DistContext, init_distributed
from quantkit.sensitivity.metrics import psnr
from quantkit.sensitivity.plot import plot_sensitivity_table
from quantkit.sensitivity.probe import SQNR_METRICS, ImageTask, SensitivityProbe, WorkItem
from quantkit.sensitivity.settings import AnalysisSettings, parse_analysis_settings

if TYPE_CHECKING:
    from quantkit.allocate.solve import Allocation

__all__ = [
    "ANALYSIS_VERSION",
    "TABLE_NAME",
    "PLOT_NAME",
    "AnalysisSettings",
    "parse_analysis_settings",
    "analysis_fingerprint",
    "work_items",
    "build_table",
    "analyze",
    "plan_scorer",
]

logger = logging.getLogger("quantkit")

ANALYSIS_VERSION = 1  # bump when a measurement changes meaning: it is part of the cache fingerprint
TABLE_NAME = "sensitivity.json"
PLOT_NAME = "sensitivity.png"
def analysis_fingerprint(config: QuantkitConfig, calibration_fp: str, settings: AnalysisSettings,
                         ssim_prompts: int, device: torch.device, dtype: torch.dtype) -> str:
    """Hash of everything one measurement depends on: model, calibration, deployed formats, SSIM set-up.

    The layer selection, the groups and the candidate lists are left out on purpose: a cache line is keyed by
    (layer, kind, bits, metric), so analysing more layers or adding a candidate reuses what was measured.
    """
    q = config.quantization
    return fingerprint_of({
        "version": ANALYSIS_VERSION,
        "model": config.model,
        "calibration": calibration_fp,
        "weights": {"group_size": q.weights.group_size, "symmetric": q.weights.symmetric},
        "activations": _act_mode(config),
        "bos_aware": q.bos_aware,
        "ssim": {"prompts": ssim_prompts, "batch_size": settings.batch_size},
        "device": device.type,
        "dtype": str(dtype),
    })


def _act_mode(config: QuantkitConfig) -> str | None:
    acts = config.quantization.activations
    return None if acts is None else ("dynamic" if acts.dynamic else "static")


def _analysed_layers(selected: list[LayerInfo], settings: AnalysisSettings) -> list[LayerInfo]:
    names = [la.fqn for la in selected]
    for key, patterns in (("layers", settings.layers), ("ignore", settings.ignore)):
        for p in patterns:
            try:
                check_pattern(p)
            except ValueError as exc:
                raise QuantkitError(f"analysis.{key}: {exc}") from None
            if not any(match(p, n) for n in names):
                raise QuantkitError(f"analysis.{key}: '{p}' matches none of the {len(names)} quantized layers "
                                    "(regexes need the 're:' prefix and match full names)")
    chosen = [la for la in selected if any(match(p, la.fqn) for p in settings.layers)
              and not any(match(p, la.fqn) for p in settings.ignore)]
    if not chosen:
        raise QuantkitError("analysis.layers/ignore leave no layer to analyse")
    return chosen


def work_items(layers: list[LayerInfo], settings: AnalysisSettings, activations: bool = True,
               has_act_stats: Callable[[str], bool] = lambda fqn: True) -> list[WorkItem]:
    """Every (layer, kind, bits) measurement, in model order: weight candidates, then activation candidates.

    Args:
        layers: the analysed layers.
        settings: groups, metrics and candidates.
        activations: whether activations are analysed at all (the config quantizes them).
        has_act_stats: whether a layer's input range is known (activation items need it).
    """
    items = []
    for la in layers:
        role = settings.role_of(la.fqn)
        metric = settings.metric_of(role)
        items += [WorkItem(la.fqn, role, "weights", b, metric) for b in settings.weight_candidates[role]]
        if activations and has_act_stats(la.fqn):
            items += [WorkItem(la.fqn, role, "activations", b, metric) for b in settings.act_candidates[role]]
    return items


def build_table(layers: list[LayerInfo], items: list[WorkItem], measures: Mapping[tuple, Mapping],
                sizes: Mapping[str, Mapping], *, settings: Mapping, cost: Mapping) -> dict:
    """The sensitivity table (the content of ``sensitivity.json``).

    Schema::

        {"schema_version": 1,
         "layers": [{"fqn", "role": "content"|"quality", "kind": "linear"|"conv", "metric": "ssim"|"sqnr"|"cfg_sqnr",
                     "num_weights", "act_elements", "macs",          # per denoiser call and per sample
                     "weights": {"<bits>": metric}, "activations": {"<bits>": metric},
                     "cost": {"evaluations", "seconds"}}],            # as measured, cached or not
         "cost": {...}, "settings": {...}}

    Raises:
        QuantkitError: a measurement is missing (a rank failed).
    """
    by_layer: dict[str, list[WorkItem]] = {}
    for it in items:
        by_layer.setdefault(it.fqn, []).append(it)
    rows = []
    for la in layers:
        own = by_layer.get(la.fqn, [])
        role = own[0].role if own else None
        entry = {"fqn": la.fqn, "role": role, "kind": la.kind, "metric": own[0].metric if own else None,
                 "weight_shape": list(la.weight_shape), "num_weights": int(sizes[la.fqn]["num_weights"]),
                 "act_elements": int(sizes[la.fqn]["act_elements"]),
                 "macs": int(sizes[la.fqn]["macs"]), "weights": {}, "activations": {}}
        evals, secs = 0, 0.0
        for it in own:
            rec = measures.get(it.key)
            if rec is None:
                raise QuantkitError(f"analysis incomplete: no measurement of {it.fqn} {it.kind} {it.bits}-bit; "
                                    "re-run quantkit analyze (finished measurements are cached)")
            entry[it.kind][str(it.bits)] = rec["value"]
            evals += int(rec["evaluations"])
            secs += float(rec["seconds"])
        entry["cost"] = {"evaluations": evals, "seconds": round(secs, 4)}
        rows.append(entry)
    return {"schema_version": 1, "layers": rows, "cost": dict(cost), "settings": dict(settings)}


def _device(settings: AnalysisSettings, ctx: DistContext, config: QuantkitConfig) -> torch.device:
    """``analysis.device``, else this rank's GPU under NCCL, else the job's ``device`` (the GPU when available)."""
    if settings.device is not None:
        return resolve_device(settings.device)
    if ctx.backend == "nccl":
        return ctx.device
    return resolve_device(config.device)


def _per_metric(items: list[WorkItem], measures: Mapping[tuple, Mapping]) -> dict:
    out: dict[str, dict] = {}
    for it in items:
        rec = measures[it.key]
        d = out.setdefault(it.metric, {"items": 0, "evaluations": 0, "seconds": 0.0})
        d["items"] += 1
        d["evaluations"] += int(rec["evaluations"])
        d["seconds"] += float(rec["seconds"])
    for d in out.values():
        d["evaluations_per_item"] = round(d["evaluations"] / d["items"], 3)
        d["seconds_per_item"] = round(d["seconds"] / d["items"], 4)
        d["seconds"] = round(d["seconds"], 3)
    return out


def analyze(config: QuantkitConfig, workdir: str | Path, settings: AnalysisSettings | Mapping | None = None, *,
            pipe=None, progress: bool = True, on_item: Callable[[dict], None] | None = None) -> Path:
    """Sensitivity analysis stage: writes ``<workdir>/analysis/sensitivity.json`` and ``sensitivity.png``.

    Runs as one process, or sharded when started by ``torchrun --nproc-per-node N`` (every rank calls this
    function with the same arguments; rank 0 writes the outputs, the others return once they exist).

    Args:
        config: the job; ``model``, ``quantization`` (layers, weight format, activations, BOS) and
            ``calibration`` are used. The calibration in ``<workdir>/calibration`` is reused when it matches,
            computed otherwise.
        workdir: the job's work folder.
        settings: :class:`AnalysisSettings` or the mapping of the config's ``analysis`` section.
        pipe: an already loaded FP pipeline of ``config.model`` (loaded otherwise).
        progress: show a progress bar with the remaining-time estimate.
        on_item: called with each finished measurement record after it is cached (progress hooks, tests).

    Returns:
        The path of ``sensitivity.json``.

    Raises:
        QuantkitError: invalid settings, patterns that match no layer, a group size that does not divide a layer.
    """
    settings = parse_analysis_settings(settings)
    workdir = Path(workdir)
    out_dir = workdir / "analysis"
    t_start = time.perf_counter()
    device = settings.device if settings.device is not None else config.device
    on_cpu = device is not None and torch.device(device).type == "cpu"
    ctx = init_distributed(settings.dist_timeout_s, backend="gloo" if on_cpu else None)
    threads = torch.get_num_threads()
    try:
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        return _analyze(config, workdir, out_dir, settings, ctx, pipe, progress, on_item, t_start)
    finally:
        torch.set_num_threads(threads)
        ctx.close()


def _image_task(pipe, art, config: QuantkitConfig, settings: AnalysisSettings) -> ImageTask:
    """The SSIM images' set-up: the first ``ssim_prompts`` calibration prompts with their seeds and sampling."""
    cal = config.calibration
    prompts = list(art.manifest.get("prompts") or [])[:settings.ssim_prompts]
    return ImageTask(pipe, prompts, cal.num_inference_steps, cal.guidance_scale, cal.seed, cal.height, cal.width,
                     settings.batch_size)


def _probe(config: QuantkitConfig, denoiser, art, images: ImageTask, device: torch.device) -> SensitivityProbe:
    q = config.quantization
    return SensitivityProbe(denoiser, art, weight_group_size=q.weights.group_size,
                            weight_symmetric=q.weights.symmetric, act_mode=_act_mode(config),
                            bos_aware=q.bos_aware, images=images, device=device)


def plan_scorer(config: QuantkitConfig, workdir: str | Path, settings: AnalysisSettings | Mapping | None = None
                ) -> Callable[[Allocation], float]:
    """A function that scores a whole bit plan by its images: higher is closer to floating point.

    The score of an :class:`~quantkit.allocate.Allocation` (a side at ``None`` bits stays 16 bit) is the mean
    PSNR (dB) over the analysis
    prompts (``analysis.ssim_prompts`` calibration prompts, their seeds and sampling settings) of the images
    generated with the plan applied in memory (weights quantized as deployed, activations fake-quantized with
    the calibrated ranges, BOS-aware as configured) against the FP images. The model and calibration
    (``<workdir>/calibration``, computed if missing or stale) are loaded at the first call.
    """
    settings = parse_analysis_settings(settings if settings is not None else config.analysis)
    state: dict = {}

    def setup() -> None:
        device = _device(settings, DistContext(), config)
        pipe = load_fp_pipeline(config.model)
        pipe.to(device)
        _, denoiser = denoiser_of(pipe)
        q = config.quantization
        selected = select_layers(find_layers(denoiser), q.targets, q.ignore)
        art = load_or_calibrate(pipe, config.calibration, selected, config.model, Path(workdir) / "calibration")
        images = _image_task(pipe, art, config, settings)
        state["probe"] = _probe(config, denoiser, art, images, device)
        state["reference"] = images.generate()

    def score(plan: Allocation) -> float:
        if not state:
            setup()
        probe = state["probe"]
        with probe.applied({f: (b.weights, b.activations) for f, b in plan.layers.items()}):
            test = probe.images.generate()
        return float(np.mean([psnr(torch.from_numpy(a), torch.from_numpy(b))
                              for a, b in zip(state["reference"], test)]))

    return score


def _analyze(config, workdir, out_dir, settings, ctx, pipe, progress, on_item, t_start) -> Path:
    device = _device(settings, ctx, config)
    if pipe is None:
        pipe = load_fp_pipeline(config.model)
    pipe.to(device)
    _, denoiser = denoiser_of(pipe)
    all_layers = find_layers(denoiser)
    q = config.quantization
    selected = select_layers(all_layers, q.targets, q.ignore)
    cal_folder = workdir / "calibration"
    if ctx.is_main:
        art = load_or_calibrate(pipe, config.calibration, selected, config.model, cal_folder)
    ctx.barrier()
    if not ctx.is_main:
        art = load_artifact(cal_folder)
        if art.manifest.get("fingerprint") != calibration_fingerprint(config.model, config.calibration, selected):
            raise QuantkitError(f"{cal_folder} does not match this config (another job wrote it meanwhile?)")
    layers = _analysed_layers(selected, settings)
    gs = q.weights.group_size
    for la in layers:
        if gs != -1 and la.in_features % gs:
            raise QuantkitError(f"group_size {gs} does not divide the input size {la.in_features} of layer "
                                f"'{la.fqn}'; use a divisor or group_size: -1, or leave it out with analysis.ignore")
    images = _image_task(pipe, art, config, settings)
    prompts = images.prompts
    dtype = next(denoiser.parameters()).dtype
    fp = analysis_fingerprint(config, art.manifest.get("fingerprint", ""), settings, len(prompts), device, dtype)
    cache = MeasurementCache(out_dir, fp, ctx.rank)
    probe = _probe(config, denoiser, art, images, device)
    fp_images_path = out_dir / f"fp-images-{fp}.safetensors"
    with probe:
        items = work_items(layers, settings, activations=q.activations is not None,
                           has_act_stats=probe.has_act_stats)
        # 1. shared set-up on rank 0: layer sizes and FP reference images (both cached)
        setup = {"evaluations": 0, "seconds": 0.0}
        if ctx.is_main:
            t0, e0 = time.perf_counter(), probe.evaluations
            measures, sizes = cache.load()
            missing = [la.fqn for la in layers if la.fqn not in sizes]
            if missing:
                for fqn, s in probe.layer_sizes(missing).items():
                    cache.append({"record": "sizes", "fqn": fqn, **s})
            pending_ssim = any(it.metric == "ssim" and it.key not in measures for it in items)
            if pending_ssim and not fp_images_path.is_file():
                from safetensors.torch import save_file

                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = fp_images_path.with_name(f".{fp_images_path.name}.tmp{os.getpid()}")
                save_file({"images": torch.from_numpy(probe.reference_images()).contiguous()}, tmp)
                os.replace(tmp, fp_images_path)
            setup = {"evaluations": probe.evaluations - e0, "seconds": round(time.perf_counter() - t0, 3)}
        ctx.barrier()
        # 2. every rank reads the same cache state, then measures its share of what is missing
        measures, sizes = cache.load()
        pending = [it for it in items if it.key not in measures]
        ctx.barrier()  # nobody appends before every rank has read: the shards must agree
        mine = ctx.shard(pending)
        if any(it.metric == "ssim" for it in mine):
            images.reference = load_safetensors(fp_images_path)["images"].numpy()
        t0, e0 = time.perf_counter(), probe.evaluations
        if any(it.metric in SQNR_METRICS for it in mine):
            if any(it.metric == "cfg_sqnr" for it in mine):
                try:  # a calibration without guidance fails here, before any work
                    probe.guidance_half()
                except ValueError as exc:
                    raise QuantkitError(str(exc)) from None
            probe.prepare_sqnr_reference()
        ref_evals = probe.evaluations - e0
        tag = f" [rank {ctx.rank}/{ctx.world_size}]" if ctx.world_size > 1 else ""
        bar = tqdm(mine, desc=f"analyze{tag}", unit="item", disable=not progress,
                   position=ctx.rank if ctx.world_size > 1 else None, smoothing=0.05)
        for it in bar:
            bar.set_postfix_str(f"{it.fqn} {it.kind[0].upper()}{it.bits}", refresh=False)
            rec = {"record": "measure", "fqn": it.fqn, "kind": it.kind, "bits": it.bits, "metric": it.metric,
                   "rank": ctx.rank, **probe.measure(it)}
            cache.append(rec)
            if on_item is not None:
                on_item(rec)
        bar.close()
        mine_cost = {"rank": ctx.rank, "items": len(mine), "evaluations": probe.evaluations - e0,
                     "reference_evaluations": ref_evals, "seconds": round(time.perf_counter() - t0, 3)}
    ranks = ctx.gather(mine_cost)
    ctx.barrier()
    table_path = out_dir / TABLE_NAME
    if ctx.is_main:
        measures, sizes = cache.load()
        all_evals = [measures[it.key] for it in items if it.key in measures]
        cost = {
            "world_size": ctx.world_size,
            "device": str(device),
            "total_items": len(items),
            "cached_items": len(items) - len(pending),
            "computed_items": len(pending),
            "run_evaluations": setup["evaluations"] + sum(r["evaluations"] for r in ranks),
            "run_seconds": round(time.perf_counter() - t_start, 3),
            "setup": setup,
            "ranks": ranks,
            "measured_evaluations": sum(int(r["evaluations"]) for r in all_evals),
            "measured_seconds": round(sum(float(r["seconds"]) for r in all_evals), 3),
        }
        resolved = {
            "fingerprint": fp, "model": config.model, "calibration_fingerprint": art.manifest.get("fingerprint"),
            "weight_format": {"group_size": gs, "symmetric": q.weights.symmetric},
            "activations": _act_mode(config),
            "bos_aware": q.bos_aware, "ssim_prompts": len(prompts), "sqnr_steps": len(art.steps),
        }
        table = build_table(layers, items, measures, sizes,
                            settings={**settings.model_dump(mode="json"), "resolved": resolved}, cost=cost)
        table["cost"]["per_metric"] = _per_metric(items, measures)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(table_path, table)
        plot_sensitivity_table(table, out_dir / PLOT_NAME)
        logger.info("analysis: %d items (%d cached), %d denoiser evaluations this run, %.1f s; wrote %s",
                    len(items), cost["cached_items"], cost["run_evaluations"], cost["run_seconds"], table_path)
    ctx.barrier()
    return table_path

