"""The pipeline stages as plain functions over files; the CLI is a thin layer over these.

``calibrate`` -> ``<workdir>/calibration/``; ``export`` -> a diffusers folder; ``evaluate_export`` ->
``<workdir>/metrics.json`` + ``<workdir>/grid.png``; ``run`` chains them; ``inspect_export`` reads an export.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from quantkit.calibrate.artifact import CalibrationArtifact, move_tensors
from quantkit.calibrate.runner import load_or_calibrate
from quantkit.config import QuantkitConfig
from quantkit.errors import QuantkitError
from quantkit.export.qconfig import qconfig_to_plan
from quantkit.export.writer import WEIGHTS_NAME, export_pipeline
from quantkit.formats.spec import bits_per_weight, stored_bits_per_weight
from quantkit.images import save_grid
from quantkit.integrations.diffusers import load_pipeline
from quantkit.io import check_safetensors, read_json, write_json
from quantkit.models.layers import find_layers, role_of, select_layers
from quantkit.models.pipeline import denoiser_of, generate, load_fp_pipeline, resolve_device
from quantkit.prompts import load_prompts
from quantkit.quantize.apply import quantize_denoiser
from quantkit.quantize.plan import apply_bos, resolve_learning, resolve_plan
from quantkit.sensitivity.metrics import psnr, sqnr, ssim

__all__ = ["default_paths", "calibrate", "analyze", "allocate", "export", "evaluate_export", "run", "inspect_export",
           "denoiser_sqnr"]

logger = logging.getLogger("quantkit")


def default_paths(config_path: str | Path | None, workdir: str | Path | None, out: str | Path | None):
    """``(workdir, out)``: ``quantkit-work/<config stem>`` and ``quantkit-out/<config stem>`` unless given."""
    stem = Path(config_path).stem if config_path else "job"
    return (Path(workdir) if workdir else Path("quantkit-work") / stem,
            Path(out) if out else Path("quantkit-out") / stem)


def _prepare(config: QuantkitConfig, device: torch.device | None = None):
    pipe = load_fp_pipeline(config.model)
    if device is not None:
        pipe.to(device)
    name, denoiser = denoiser_of(pipe)
    layers = find_layers(denoiser)
    plan = resolve_plan(layers, config.quantization)
    return pipe, name, denoiser, layers, plan


def _needs_static_stats(plan) -> bool:
    # Codebook (JLCM) layers learn on the recorded calibration inputs.
    return any((s.act is not None and not s.act.dynamic) or s.is_codebook for s in plan.values())


def calibrate(config: QuantkitConfig, workdir: str | Path, force: bool = False) -> Path:
    """Calibration stage: observe the selected layers' inputs over the prompts; returns the artifact folder.

    A matching calibration already in ``workdir`` is reused unless ``force``. The pipeline runs on
    ``config.device`` (the GPU when there is one); the artifact is the same whatever the device.
    """
    pipe, _, denoiser, layers, _ = _prepare(config, resolve_device(config.device))
    selected = select_layers(layers, config.quantization.targets, config.quantization.ignore)
    folder = Path(workdir) / "calibration"
    art = load_or_calibrate(pipe, config.calibration, selected, config.model, folder, force=force)
    report = art.manifest.get("text_token_report")
    if report:
        others = report["other_tokens_absmax"]
        logger.warning("text embedding (%s): first token absmax %.3g vs %.3g for the other tokens; first token "
                       "prompt-invariant: %s", report["layer"], report["first_token_absmax"], others,
                       "yes" if report["first_token_prompt_invariant"] else "no")
    return folder


def analyze(config: QuantkitConfig, workdir: str | Path, progress: bool = True) -> Path:
    """Analysis stage: MixDQ's per-layer, per-bit sensitivity (SSIM for content, SQNR for quality layers).

    Writes ``<workdir>/analysis/sensitivity.json`` and ``sensitivity.png``; cached and resumable, and sharded over
    ranks under ``torchrun`` (see :mod:`quantkit.sensitivity.analyze`).
    """
    from quantkit.sensitivity.analyze import analyze as run_analysis

    return run_analysis(config, workdir, config.analysis, progress=progress)


def _allocation_problem(config: QuantkitConfig, workdir: Path):
    """The integer program of ``config`` over ``<workdir>/analysis/sensitivity.json`` (``quantkit analyze``)."""
    from quantkit.allocate import AllocationProblem, LayerSpec, objective_values

    table_path = workdir / "analysis" / "sensitivity.json"
    if not table_path.is_file():
        raise QuantkitError(f"no sensitivity table at {table_path}; run quantkit analyze with this config first")
    table = read_json(table_path)
    s = config.allocation
    overhead = _layer_overhead_bits(table["layers"], config)
    specs = []
    for la in table["layers"]:
        metric = la.get("metric") or ("ssim" if la["role"] == "content" else "sqnr")
        acts = objective_values(metric, la.get("activations") or {}, s.sqnr_objective)
        specs.append(LayerSpec(fqn=la["fqn"], role=la["role"], num_weights=int(la["num_weights"]),
                               act_elements=int(la.get("act_elements", 0)), macs=int(la.get("macs", 0)),
                               weight_metric=objective_values(metric, la["weights"], s.sqnr_objective),
                               act_metric=acts or None, overhead_bits=overhead.get(la["fqn"], 0)))
    return AllocationProblem(specs, weight_candidates={r: tuple(b) for r, b in s.weight_candidates.items()},
                             act_candidates={r: tuple(b) for r, b in s.act_candidates.items()},
                             content_weight=0.5 if s.content_weight == "auto" else s.content_weight,
                             stored_bits=stored_bits_per_weight)


def _solve_plan(config: QuantkitConfig, workdir: Path, problem, scorer=None):
    """One plan under ``config.allocation``'s budgets: ``(allocation, content-weight trials or None)``; with
    ``content_weight: auto`` the grid's plans are judged by ``scorer`` (default: the analysis prompts' images)."""
    from quantkit.allocate import allocate as solve
    from quantkit.allocate.select import choose_content_weight
    from quantkit.sensitivity.analyze import plan_scorer

    s = config.allocation
    options = {"time_limit": s.solver_time_limit_s} if s.solver == "pulp" else {}

    def run(p):
        return solve(p, weight_budget_bits=s.weight_bits, weight_budget_mb=s.weight_mb, act_budget_bits=s.act_bits,
                     max_bops=s.max_bops, protect_top_percent=s.protect_top_percent, solver=s.solver,
                     solver_options=options)

    if s.content_weight != "auto":
        return run(problem), None
    return choose_content_weight(problem, s.content_weight_grid, run, scorer or plan_scorer(config, workdir))


def _write_plan_atomic(result, path: Path) -> None:
    from quantkit.allocate import write_plan

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write_plan(result, tmp)
    tmp.replace(path)


def allocate(config: QuantkitConfig, workdir: str | Path, plan_path: str | Path | None = None) -> Path:
    """Allocation stage: MixDQ's integer program over the sensitivity table; writes the plan YAML and its plot.

    Reads ``<workdir>/analysis/sensitivity.json`` (``quantkit analyze``); budgets and candidates come from the
    config's ``allocation`` section. Returns the plan path (default ``<workdir>/plan.yaml``; the plot is written
    next to it as ``<plan stem>.png``).

    Raises:
        QuantkitError: no sensitivity table, or an infeasible budget (the message gives the achievable range).
    """
    from quantkit.allocate import plot_allocation

    workdir = Path(workdir)
    problem = _allocation_problem(config, workdir)
    plan_path = Path(plan_path) if plan_path else workdir / "plan.yaml"
    result, trials = _solve_plan(config, workdir, problem)
    _write_plan_atomic(result, plan_path)
    plot_allocation(result, plan_path.with_suffix(".png"))
    if trials is not None:
        sweep = {"chosen": result.content_weight, "score": "mean PSNR (dB) of the analysis prompts' images vs FP",
                 "trials": [t.to_dict() for t in trials]}
        write_json(plan_path.with_name(f"{plan_path.stem}-content-weight.json"), sweep)
        logger.info("allocate: content_weight auto -> %g (%s)", result.content_weight, ", ".join(
            f"{t.content_weight:g}: " + (f"{t.score:.2f} dB" if t.score is not None else
                                         f"= {t.same_as:g}" if t.same_as is not None else "only plan")
            for t in trials))
    return plan_path


def allocate_sweep(config: QuantkitConfig, workdir: str | Path, kind: str, values, out_dir: str | Path | None = None
                   ) -> Path:
    """A Pareto sweep of one budget: one plan per value, the other budgets as configured (a swept weight budget
    replaces the config's other one: ``weight_bits`` and ``weight_mb`` are exclusive).

    Writes ``<out_dir>/plan-<kind>-<value>.yaml`` for every feasible value, ``sweep.json`` (per value: the file,
    achieved cost, objective, content weight and, with ``content_weight: auto``, the mean PSNR of the analysis
    prompts' images against FP that chose it; infeasible values with the reason) and ``sweep.png`` (objective
    against the swept cost). ``out_dir`` defaults to ``<workdir>/sweep-<kind>``. Returns the JSON path.

    Raises:
        QuantkitError: an unknown kind, no values, or no feasible value (with the achievable range).
    """
    from quantkit.allocate import SWEEP_KINDS, InfeasibleBudget, plot_pareto
    from quantkit.sensitivity.analyze import plan_scorer

    if kind not in SWEEP_KINDS:
        raise QuantkitError(f"unknown sweep budget {kind!r}: choose one of {', '.join(SWEEP_KINDS)}")
    values = [float(v) for v in values]
    if not values:
        raise QuantkitError("a sweep needs at least one budget value, e.g. weight_bits=2,3,4")
    workdir = Path(workdir)
    out_dir = Path(out_dir) if out_dir else workdir / f"sweep-{kind}"
    problem = _allocation_problem(config, workdir)
    scorer = plan_scorer(config, workdir) if config.allocation.content_weight == "auto" else None
    rows, plans, errors = [], [], []
    for value in tqdm(values, desc=f"sweep {kind}", disable=len(values) < 2):
        budget = config.allocation.model_copy(update=config.allocation.budget_update(kind, value))
        cfg = config.model_copy(update={"allocation": budget})
        try:
            result, trials = _solve_plan(cfg, workdir, problem, scorer)
        except InfeasibleBudget as exc:
            rows.append({"value": value, "infeasible": str(exc)})
            errors.append(str(exc))
            continue
        path = out_dir / f"plan-{kind}-{value:g}.yaml"
        _write_plan_atomic(result, path)
        plans.append(result)
        # content_weight auto scored the plan by its images: keep that score (None when the grid gave one plan)
        psnr = next((t.score for t in trials or () if t.content_weight == result.content_weight), None)
        rows.append({"value": value, "plan": path.name, "objective": result.objective,
                     "content_weight": result.content_weight, "achieved": vars(result.achieved),
                     "image_psnr_db": psnr})
    if not plans:
        raise QuantkitError(f"no feasible value in the sweep of {kind}: {errors[0]}")
    plot_pareto(plans, out_dir / "sweep.png", x="bops" if kind == "max_bops" else kind)  # the Achieved field
    path = out_dir / "sweep.json"
    write_json(path, {"kind": kind, "values": rows})
    return path


def _layer_overhead_bits(table_layers: list[dict], config: QuantkitConfig) -> dict[str, int]:
    """``{fqn: bits}`` each analysed layer stores besides its codes once quantized (scales, zero points, shape),
    in the format the config gives it (group size and symmetry do not change with the allocated bit-width).
    Tables written before weight shapes were recorded give ``{}``: ``weight_mb`` then counts the codes alone."""
    from quantkit.formats.spec import side_bits
    from quantkit.models.layers import LayerInfo
    from quantkit.quantize.plan import resolve_plan

    if not all("weight_shape" in la for la in table_layers):
        logger.warning("quantkit: this sensitivity table has no weight shapes (written by an older quantkit), so "
                       "the weight_mb budget counts packed codes only, not scales; re-run quantkit analyze")
        return {}
    layers = [LayerInfo(la["fqn"], la.get("kind", "linear"), tuple(la["weight_shape"]), la.get("role") or "quality")
              for la in table_layers]
    settings = config.quantization.model_copy(update={"plan": None, "targets": ["re:.*"], "ignore": []})
    try:
        plan = resolve_plan(layers, settings)
    except QuantkitError as exc:  # e.g. an override naming layers that were not analysed
        logger.warning("quantkit: the weight_mb budget counts packed codes only, not scales (%s)", exc)
        return {}
    return {la.fqn: side_bits(plan[la.fqn].weight, la.weight_shape) for la in layers if la.fqn in plan}


def export(config: QuantkitConfig, out: str | Path, workdir: str | Path, overwrite: bool = False) -> Path:
    """Export stage: quantize the denoiser by the config's plan and write a diffusers folder at ``out``.

    Static activation formats read ``<workdir>/calibration`` (calibrating first when it is missing or stale).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise QuantkitError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    pipe, name, denoiser, layers, plan = _prepare(config)
    art = None
    if _needs_static_stats(plan):
        selected = select_layers(layers, config.quantization.targets, config.quantization.ignore)
        art = load_or_calibrate(pipe, config.calibration, selected, config.model, Path(workdir) / "calibration")
        if config.quantization.bos_aware:
            plan = apply_bos(plan, art)
    quantize_denoiser(denoiser, plan, art, learning=resolve_learning(plan, config.quantization))
    ignored = [la.fqn for la in layers if la.fqn not in plan]
    return export_pipeline(pipe, name, plan, out, overwrite=overwrite, float_dtype=config.export.float_dtype,
                           ignore=ignored)


@torch.inference_mode()
def denoiser_sqnr(denoiser: torch.nn.Module, art: CalibrationArtifact) -> float:
    """SQNR (dB) of ``denoiser``'s output against the recorded FP outputs, over every calibration step."""
    signal = noise = 0.0
    device = next(denoiser.parameters()).device
    for step in art.steps:
        out = denoiser(*move_tensors(step["args"], device), **move_tensors(step["kwargs"], device))
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        ref = step["output"].to(torch.float64)
        signal += ref.pow(2).sum().item()
        noise += (out.to("cpu", torch.float64) - ref).pow(2).sum().item()
    return sqnr(torch.tensor([math.sqrt(signal)]), torch.tensor([math.sqrt(signal) + math.sqrt(noise)]))


def _denoiser_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def evaluate_export(config: QuantkitConfig, out: str | Path, workdir: str | Path, clip=None) -> dict:
    """Compare the exported pipeline with the FP one: denoiser SQNR, image PSNR/SSIM, sizes; writes JSON + PNG.

    With ``evaluation.clip_model`` also the CLIP score of both image sets and its paired difference (``clip``: an
    already loaded :class:`~quantkit.clipscore.ClipScorer`, else it is loaded here).
    """
    out, workdir = Path(out), Path(workdir)
    device = resolve_device(config.device)
    fp = load_fp_pipeline(config.model).to(device)
    fp_name, fp_denoiser = denoiser_of(fp)
    q = load_pipeline(out).to(device)
    _, q_denoiser = denoiser_of(q)
    cal, ev = config.calibration, config.evaluation
    prompts = load_prompts(cal.prompts, ev.num_images)
    args = (cal.num_inference_steps, cal.guidance_scale, ev.seed, cal.height, cal.width)
    fp_imgs = np.asarray(generate(fp, prompts, *args))
    q_imgs = np.asarray(generate(q, prompts, *args))
    to_t = torch.from_numpy
    metrics = {
        "model": config.model,
        "pipeline_class": type(fp).__name__,
        "images": len(prompts),
        "image_psnr_db": float(np.mean([psnr(to_t(a), to_t(b)) for a, b in zip(fp_imgs, q_imgs)])),
        "image_ssim": float(np.mean([ssim(to_t(a), to_t(b)) for a, b in zip(fp_imgs, q_imgs)])),
    }
    if ev.clip_model is not None:
        from quantkit.clipscore import load_clip_scorer
        from quantkit.stats import paired_mean_difference

        clip = clip or load_clip_scorer(ev.clip_model, device=device)
        fp_scores, q_scores = clip.scores(fp_imgs, prompts), clip.scores(q_imgs, prompts)
        metrics.update(clip_model=ev.clip_model, clip_score_fp=float(fp_scores.mean()),
                       clip_score=float(q_scores.mean()),
                       clip_score_vs_fp=paired_mean_difference(q_scores, fp_scores, seed=ev.seed))
    cal_folder = workdir / "calibration"
    if (cal_folder / "manifest.json").is_file():
        from quantkit.calibrate.artifact import load_artifact

        metrics["denoiser_sqnr_db"] = denoiser_sqnr(q_denoiser, load_artifact(cal_folder))
    fp16_bytes = sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                     for t in fp_denoiser.state_dict().values())
    q_bytes = _denoiser_bytes(out / fp_name)
    metrics.update(denoiser_fp16_bytes=fp16_bytes, denoiser_quantized_bytes=q_bytes,
                   size_ratio_vs_fp16=round(q_bytes / fp16_bytes, 4))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_grid([fp_imgs, q_imgs], ["FP", "quantized"], workdir / "grid.png")
    return metrics


def run(config: QuantkitConfig, out: str | Path, workdir: str | Path, overwrite: bool = False) -> dict:
    """All stages: calibrate -> export -> reload and evaluate. Returns the metrics (also in ``workdir``)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise QuantkitError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    t0 = time.perf_counter()
    clip = None
    if config.evaluation.clip_model is not None:  # a bad CLIP spec fails before the long stages
        from quantkit.clipscore import load_clip_scorer

        clip = load_clip_scorer(config.evaluation.clip_model, device=resolve_device(config.device))
    calibrate(config, workdir)
    export(config, out, workdir, overwrite=overwrite)
    metrics = evaluate_export(config, out, workdir, clip=clip)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    (Path(workdir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def inspect_export(path: str | Path) -> dict:
    """Per-layer table of an exported pipeline (or component folder): name, role, shape, format, bits, bytes.

    Reads only JSON and safetensors headers/small tensors. Returns ``{"component", "layers", "totals"}``.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        comps = [p for p in sorted(path.iterdir()) if (p / "config.json").is_file()
                 and "quantization_config" in read_json(p / "config.json")]
        if not comps:
            raise QuantkitError(f"{path} has no quantkit-quantized component")
        path = comps[0]
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QuantkitError(f"{path} is neither an exported pipeline nor a quantized component folder")
    qc = read_json(cfg_path).get("quantization_config")
    if qc is None:
        raise QuantkitError(f"{cfg_path} has no quantization_config: not a quantkit export")
    weights = path / WEIGHTS_NAME
    check_safetensors(weights)
    plan = qconfig_to_plan(qc)
    rows, total_bytes, fp16_bytes = [], 0, 0
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        sizes = {}
        for k in keys:
            sl = f.get_slice(k)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            nbytes = math.prod(shape) * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "U8": 1, "I8": 1,
                                         "F64": 8, "BOOL": 1}.get(dtype, 4)
            sizes[k] = (shape, dtype, nbytes)
            total_bytes += nbytes
        layer_keys = set()
        for fqn, scheme in plan.items():
            wshape = tuple(int(v) for v in f.get_tensor(f"{fqn}.weight_shape").tolist())
            own = {k: v for k, v in sizes.items() if k.startswith(fqn + ".") and "." not in k[len(fqn) + 1:]}
            layer_keys.update(own)
            wt = {k: f.get_tensor(k) for k in own if k.split(".")[-1].startswith("weight_")}
            numel = math.prod(wshape)
            bias = own.get(f"{fqn}.bias")
            rows.append({
                "name": fqn, "role": role_of(fqn), "shape": list(wshape), "format": scheme.name,
                "bits_per_weight": round(bits_per_weight(wt, numel), 3),
                "bytes": sum(v[2] for v in own.values()),
                "fp16_bytes": 2 * numel + (2 * math.prod(bias[0]) if bias else 0),
            })
            fp16_bytes += rows[-1]["fp16_bytes"]
        for k, (shape, dtype, nbytes) in sizes.items():
            if k not in layer_keys:
                fp16_bytes += 2 * math.prod(shape) if dtype in ("F16", "BF16", "F32", "F64") else nbytes
    totals = {"layers": len(rows), "bytes": total_bytes, "fp16_bytes": fp16_bytes,
              "ratio_vs_fp16": round(total_bytes / fp16_bytes, 4) if fp16_bytes else None}
    return {"component": str(path), "layers": rows, "totals": totals}
