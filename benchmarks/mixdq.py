"""MixDQ on the trained reference model: does the plan beat uniform, random and single-metric plans?

    PYTHONPATH=src python benchmarks/mixdq.py                       # everything (about 1 h on 2 shared cores)
    PYTHONPATH=src python benchmarks/mixdq.py --sections uniform    # one part; finished parts are cached

Measures issue 4's "Done means" on ``builtin:digits`` (src/quantkit/reference/assets), with the stage functions
of the product (``quantkit analyze/allocate/export`` via :mod:`quantkit.stages`, the exported folders reloaded
with :func:`quantkit.integrations.diffusers.load_pipeline`), driven by configs/digits-mixdq-w3.yaml and
configs/digits-mixdq-a4.yaml:

``uniform``  FP (two image seeds: the run-to-run noise) and uniform naive W8A8, W4A8, W3A8, W2A8, W8A4, W8A3.
``analyze``  MixDQ sensitivity (SSIM content / SQNR quality), candidates W{2,3,4,8} A{3,4,8} for both groups;
             the single-metric table (SQNR for every layer); a cached re-run; per-layer cost.
``weight``   weight budget (average weight bits of uniform W3, activations A8) at equal exported bytes:
             uniform W3A8 vs 5 random plans vs MixDQ as published (dB objective, content weight 0.5) and its
             SQNR-only plan vs the noise-energy objective at weight 0.5 vs quantkit's default allocator
             (noise energy, content_weight auto) with the MixDQ table and with the SQNR-only table.
``act``      activation budget (average activation bits of uniform A4, weights W8): the same variants.
``bos``      BOS-aware vs naive static quantization of the cross-attention to_k/to_v inputs, on the reference
             model and on a copy with an injected BOS outlier (the reference model has none).
``confirm``  the uniform, MixDQ and noise-power variants of both budgets again with other image seeds.
``paired``   the default plan against SQNR-only through the same allocator and against uniform (and the
             guidance-direction plan against SQNR-only), per image: accuracy differences with exact McNemar
             p-values, and 95 % paired bootstrap intervals of the accuracy and Frechet differences, per seed
             and with both seeds pooled.
``neighbourhood``  the default and SQNR-only plans with one random layer one candidate step more precise (8
             each), and the SQNR-only plan with each layer on which the two differ set as in the default: the
             scale of accuracy changes that come from chance rather than sensitivity.
``sweep``    more budgets, fixed before they were measured (weights: the exported sizes of 2.1, 2.25, 2.5, 2.75
             and 3.5 average bits, interpolated between uniform sizes; activations: 3.5, 3.75 and 4.5 average bits): the
             default plan against SQNR-only through the same allocator (and the guidance-direction plan), both
             image seeds, paired per budget and pooled over every budget of a kind with the main budget point.
``cost``     analysis wall time, 1 process vs 2 processes (torchrun), on a subset of layers.

Every evaluation generates ``--num-images`` images (4 steps, the reference model's default guidance, image ``i``
with seed ``1000 + i``)
for checkable prompts and reports judge accuracy per attribute (alignment), Frechet distance to real digits in
judge features (quality) and PSNR/SSIM against the FP images of the same prompts and seeds. Sizes are the bytes
of each variant's exported UNet folder (``*.safetensors``).

Writes ``benchmarks/results/mixdq.json``, ``benchmarks/results/mixdq.png`` (and ``mixdq-sweep.png``) and prints
Markdown. The work folder (``quantkit-work/mixdq-bench/<unet sha256[:12]>``) caches every finished evaluation, so
a re-run on the same model only re-prints; a changed model (new sha256) recomputes everything.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quantkit.allocate import (  # noqa: E402
    Allocation,
    AllocationProblem,
    LayerBits,
    LayerSpec,
    read_plan,
    write_plan,
)
from quantkit.allocate import allocate as solve  # noqa: E402
from quantkit.allocate.select import choose_content_weight  # noqa: E402
from quantkit.config import parse_config  # noqa: E402
from quantkit.formats.spec import values_per_word  # noqa: E402
from quantkit.integrations.diffusers import load_pipeline  # noqa: E402
from quantkit.io import read_json  # noqa: E402
from quantkit.models.layers import find_layers, is_text_kv, select_layers  # noqa: E402
from quantkit.models.pipeline import load_fp_pipeline  # noqa: E402
from quantkit.reference import (  # noqa: E402
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_PIPELINE_DIR,
    default_prompts,
    generate,
    load_judge,
    real_images,
    unet_sha256,
)
from quantkit.reference.judges import (  # noqa: E402
    extract_features,
    frechet_distance_from_features,
    judge_accuracy,
    judge_correct,
    paired_comparison,
)
from quantkit.sensitivity.analyze import plan_scorer  # noqa: E402
from quantkit.sensitivity.metrics import psnr, ssim  # noqa: E402

CONFIG_W = ROOT / "configs" / "digits-mixdq-w3.yaml"
CONFIG_A = ROOT / "configs" / "digits-mixdq-a4.yaml"
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("uniform", "analyze", "weight", "act", "confirm", "paired", "neighbourhood", "sweep", "bos", "cost")
IMAGE_SEED = 1000  # image i of an evaluation uses seed IMAGE_SEED + i
NOISE_SEED = 5000  # the FP model's second run (run-to-run noise)
PROMPT_SEED = 1  # shuffle of the evaluation prompts (calibration uses default_prompts(16, seed=0))
WEIGHT_CANDS = [2, 3, 4, 8]
ACT_CANDS = [3, 4, 8]
# The model under test: the reference model, or another digits pipeline folder (``--pipeline``, e.g. the
# cross-attention-only ablation of ``python -m quantkit.reference.train --no-pooled-text``).
MODEL = {"name": "builtin:digits", "dir": Path(DEFAULT_PIPELINE_DIR)}
COST_LAYERS = [  # the subset timed with 1 and 2 processes: 3 content (SSIM) and 3 quality (SQNR) layers
    "conv_in",
    "down_blocks.1.resnets.0.conv2",
    "mid_block.resnets.0.conv1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
]


def log(msg: str) -> None:
    print(f"[mixdq {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_config() -> dict:
    data = yaml.safe_load(CONFIG_W.read_text())
    data["quantization"]["plan"] = None
    data["model"] = MODEL["name"]
    return data


def make_config(*, wbits: int = 8, abits: int | None = 8, plan: Path | None = None, bos: bool = True,
                overrides: list | None = None, analysis: dict | None = None, allocation: dict | None = None):
    """A config of the benchmark: the YAML of configs/digits-mixdq-w3.yaml with some keys replaced."""
    d = base_config()
    q = d["quantization"]
    q["weights"]["bits"] = wbits
    q["activations"] = None if abits is None else {"bits": abits, "dynamic": False}
    q["plan"] = None if plan is None else str(plan)
    q["bos_aware"] = bos
    q["overrides"] = overrides or []
    if analysis:
        d["analysis"].update(analysis)
    if allocation:
        d["allocation"].update(allocation)
    return parse_config(d, "benchmarks/mixdq.py")


# -- evaluation ------------------------------------------------------------------------------------------------


class Evaluator:
    """Generates the evaluation images of a pipeline and judges them; caches every result by name."""

    def __init__(self, work: Path, num_images: int):
        self.work = work
        self.n = num_images
        self.prompts = default_prompts(num_images, seed=PROMPT_SEED)
        self.judge = load_judge()
        self.real_ref = extract_features(real_images(self.prompts, "train", seed=PROMPT_SEED + 1), self.judge)
        held = real_images(self.prompts, "heldout", seed=PROMPT_SEED + 2)
        self.floor = frechet_distance_from_features(extract_features(held, self.judge), self.real_ref)
        self.real_acc = judge_accuracy(held, self.prompts, self.judge)
        self.fp_images: dict[str, torch.Tensor] = {}
        (work / "evals").mkdir(parents=True, exist_ok=True)
        (work / "images").mkdir(parents=True, exist_ok=True)

    def _cached(self, name: str) -> dict | None:
        path = self.work / "evals" / f"{name}-n{self.n}.json"
        return read_json(path) if path.is_file() and self._per_image_path(name).is_file() else None

    def _per_image_path(self, name: str) -> Path:
        return self.work / "evals" / f"{name}-n{self.n}.npz"

    def per_image(self, name: str) -> dict[str, np.ndarray]:
        """The judge's per-image outcomes of an evaluation: ``correct_<attribute>`` (bool) and ``features``."""
        with np.load(self._per_image_path(name), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def _images(self, pipe, seed: int) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.inference_mode():
            imgs = generate(pipe, self.prompts, num_inference_steps=4, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                            seed=seed, batch_size=64)
        log(f"  generated {len(imgs)} images in {time.perf_counter() - t0:.1f} s")
        return imgs

    def fp(self, key: str = "fp", pipe_factory=None, seed: int = IMAGE_SEED) -> torch.Tensor:
        """FP images (cached on disk) of the reference pipeline, or of ``pipe_factory()`` under ``key``."""
        if key in self.fp_images:
            return self.fp_images[key]
        path = self.work / "images" / f"{key}-seed{seed}-n{self.n}.safetensors"
        if path.is_file():
            imgs = load_file(str(path))["images"]
        else:
            pipe = pipe_factory() if pipe_factory else load_fp_pipeline(MODEL["name"])
            imgs = self._images(pipe, seed)
            save_file({"images": imgs.contiguous()}, str(path))
        self.fp_images[key] = imgs
        return imgs

    def judged(self, imgs: torch.Tensor) -> tuple[dict, dict[str, np.ndarray]]:
        """Summary (accuracy per attribute, Frechet) and the per-image outcomes behind it."""
        correct = judge_correct(imgs, self.prompts, self.judge)
        feats = extract_features(imgs, self.judge)
        summary = {"accuracy": {a: float(c.mean()) for a, c in correct.items()},
                   "frechet": frechet_distance_from_features(feats, self.real_ref)}
        return summary, {**{f"correct_{a}": c for a, c in correct.items()}, "features": feats}

    def evaluate(self, name: str, pipe_factory, *, fp_key: str = "fp", seed: int = IMAGE_SEED,
                 extra: dict | None = None, save_as_fp: str | None = None) -> dict:
        """Judge ``pipe_factory()``'s images; fidelity against the FP images of ``fp_key`` (same prompts/seeds).

        ``save_as_fp`` keeps the images as the FP reference under that key (for another model's variants).
        """
        hit = self._cached(name)
        if hit is not None:
            return hit
        log(f"evaluate {name}")
        t0 = time.perf_counter()
        extra = dict(extra or {})
        pipe = pipe_factory()
        if isinstance(pipe, tuple):
            pipe, more = pipe
            extra.update(more)
        imgs = self._images(pipe, seed)
        del pipe
        if save_as_fp:
            path = self.work / "images" / f"{save_as_fp}-seed{seed}-n{self.n}.safetensors"
            save_file({"images": imgs.contiguous()}, str(path))
            self.fp_images[save_as_fp] = imgs
        ref = self.fp(fp_key)
        summary, per_image = self.judged(imgs)
        np.savez(self._per_image_path(name), **per_image)
        rec = {"name": name, "num_images": self.n, "seed": seed, **summary,
               "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(ref, imgs)])),
               "ssim": float(np.mean([ssim(a[None], b[None]) for a, b in zip(ref, imgs)])),
               "seconds": round(time.perf_counter() - t0, 1), **extra}
        (self.work / "evals" / f"{name}-n{self.n}.json").write_text(json.dumps(rec, indent=1) + "\n")
        save_file({"images": imgs[:16].contiguous()}, str(self.work / "images" / f"{name}-first16.safetensors"))
        log(f"  {name}: digit {rec['accuracy']['digit']:.3f} colour {rec['accuracy']['colour']:.3f} position "
            f"{rec['accuracy']['position']:.3f} frechet {rec['frechet']:.2f} psnr {rec['psnr_db']:.2f} "
            f"ssim {rec['ssim']:.4f}")
        return rec


def unet_bytes(export: Path) -> int:
    return sum(f.stat().st_size for f in (export / "unet").glob("*.safetensors"))


def export_variant(work: Path, name: str, config) -> tuple[Path, int]:
    """``quantkit export`` of ``config`` into the work folder (reused if already there); returns (folder, bytes)."""
    from quantkit.stages import export

    out = work / "exports" / name
    if not (out / "model_index.json").is_file():
        export(config, out, work / "job", overwrite=True)
    return out, unet_bytes(out)


def exported_factory(work: Path, name: str, config):
    def factory():
        out, nbytes = export_variant(work, name, config)
        pipe = load_pipeline(out)
        pipe.set_progress_bar_config(disable=True)
        return pipe, {"unet_bytes": nbytes}
    return factory


# -- uniform baselines -----------------------------------------------------------------------------------------

UNIFORM = [("W8A8", 8, 8), ("W4A8", 4, 8), ("W3A8", 3, 8), ("W2A8", 2, 8), ("W8A4", 8, 4), ("W8A3", 8, 3)]


def run_uniform(work: Path, ev: Evaluator, skip: tuple[str, ...] = ()) -> dict:
    out = {"FP": ev.evaluate("FP", lambda: load_fp_pipeline(MODEL["name"]), save_as_fp="fp"),
           "FP (seed 2)": ev.evaluate("FP-seed2", lambda: load_fp_pipeline(MODEL["name"]), seed=NOISE_SEED)}
    for name, wb, ab in UNIFORM:
        if name in skip:
            continue
        cfg = make_config(wbits=wb, abits=ab)
        out[name] = ev.evaluate(f"uniform-{name}", exported_factory(work, f"uniform-{name}", cfg),
                                extra={"weight_bits": wb, "act_bits": ab})
    return out


# -- analysis --------------------------------------------------------------------------------------------------


def run_analysis(work: Path) -> dict:
    """MixDQ table, SQNR-only table, and a cached re-run; returns their costs and keeps copies of the tables."""
    from quantkit.stages import analyze

    res_path = work / "analysis-summary.json"
    if res_path.is_file():
        return read_json(res_path)
    job = work / "job"
    mixdq_cfg = make_config()
    sqnr_cfg = make_config(analysis={"content_metric": "sqnr"})
    log("analyze (MixDQ: SSIM content, SQNR quality)")
    t0 = time.perf_counter()
    table = read_json(analyze(mixdq_cfg, job, progress=False))
    first_s = time.perf_counter() - t0
    shutil.copy(job / "analysis" / "sensitivity.json", work / "sensitivity-mixdq.json")
    shutil.copy(job / "analysis" / "sensitivity.png", work / "sensitivity-mixdq.png")
    log("analyze (single metric: SQNR for every layer)")
    t0 = time.perf_counter()
    sq = read_json(analyze(sqnr_cfg, job, progress=False))
    sqnr_s = time.perf_counter() - t0
    shutil.copy(job / "analysis" / "sensitivity.json", work / "sensitivity-sqnr.json")
    log("analyze (MixDQ again: everything cached)")
    t0 = time.perf_counter()
    again = read_json(analyze(mixdq_cfg, job, progress=False))
    again_s = time.perf_counter() - t0

    per_role: dict = {}
    for la in table["layers"]:
        d = per_role.setdefault(la["role"], {"layers": 0, "evaluations": 0, "seconds": 0.0, "metric": la["metric"],
                                             "items": 0})
        d["layers"] += 1
        d["items"] += len(la["weights"]) + len(la["activations"])
        d["evaluations"] += la["cost"]["evaluations"]
        d["seconds"] += la["cost"]["seconds"]
    for d in per_role.values():
        d["evaluations_per_layer"] = round(d["evaluations"] / d["layers"], 2)
        d["seconds_per_layer"] = round(d["seconds"] / d["layers"], 3)
        d["seconds"] = round(d["seconds"], 1)
    summary = {
        "layers": len(table["layers"]),
        "items": table["cost"]["total_items"],
        "mixdq_first_run": {k: table["cost"][k] for k in ("computed_items", "cached_items", "run_evaluations",
                                                          "run_seconds", "setup")} | {"wall_s": round(first_s, 1)},
        "per_metric": table["cost"]["per_metric"],
        "per_role": per_role,
        "sqnr_only_run": {k: sq["cost"][k] for k in ("computed_items", "cached_items", "run_evaluations",
                                                     "run_seconds")} | {"wall_s": round(sqnr_s, 1)},
        "cached_rerun": {k: again["cost"][k] for k in ("computed_items", "cached_items", "run_evaluations",
                                                       "run_seconds")} | {"wall_s": round(again_s, 1)},
        "calibration": {k: read_json(job / "calibration" / "manifest.json").get(k)
                        for k in ("denoiser_calls", "seconds", "text_token_report")},
        "tables": {"mixdq": str(work / "sensitivity-mixdq.json"), "sqnr_only": str(work / "sensitivity-sqnr.json")},
    }
    res_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run_cfg_analysis(work: Path) -> dict:
    """The metric-decoupled table with the guidance-direction SQNR (``content_metric: cfg_sqnr``) for the content
    layers: quality layers come from the cache (same measurements as the MixDQ table), content layers are new."""
    from quantkit.stages import analyze

    res_path = work / "analysis-cfg-summary.json"
    if res_path.is_file():
        return read_json(res_path)
    job = work / "job"
    log("analyze (content layers by guidance-direction SQNR, quality layers by SQNR)")
    t0 = time.perf_counter()
    table = read_json(analyze(make_config(analysis={"content_metric": "cfg_sqnr"}), job, progress=False))
    shutil.copy(job / "analysis" / "sensitivity.json", work / "sensitivity-cfg.json")
    shutil.copy(job / "analysis" / "sensitivity.png", work / "sensitivity-cfg.png")
    summary = {"wall_s": round(time.perf_counter() - t0, 1),
               **{k: table["cost"][k] for k in ("computed_items", "cached_items", "run_evaluations", "run_seconds")},
               "per_metric": table["cost"]["per_metric"], "table": str(work / "sensitivity-cfg.json")}
    res_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# -- plans -----------------------------------------------------------------------------------------------------


def layer_shapes() -> dict[str, tuple[int, int]]:
    """``{fqn: (out_features, flattened in_features)}`` of every quantizable layer of the reference UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(MODEL["dir"] / "unet"))
    return {la.fqn: (la.weight_shape[0], la.in_features) for la in find_layers(unet)}


def code_bytes(shape: tuple[int, int], bits: int) -> int:
    """Bytes of a layer's packed weight codes (int32 words, ``values_per_word(bits)`` codes per word)."""
    out_f, in_f = shape
    return out_f * math.ceil(in_f / values_per_word(bits)) * 4


def _noise_power(metric: str, value: float) -> float:
    """``-10**(-SQNR/10)`` (minus the relative noise energy, additive over layers) for SQNR; SSIM unchanged."""
    return -(10.0 ** (-value / 10.0)) if metric in ("sqnr", "cfg_sqnr") else value


def problem_from(table_path: Path, wcands: list[int], acands: list[int], noise_power: bool = False
                 ) -> AllocationProblem:
    """The allocation problem of ``quantkit allocate`` (same construction as :func:`quantkit.stages.allocate`).

    ``noise_power`` (not MixDQ: the proposal this benchmark tests after MixDQ's own objective) replaces each
    SQNR value by minus its relative noise energy, so that the program's sum over layers adds noise powers
    instead of decibels.
    """
    table = read_json(table_path)

    def tr(la, values):
        return {int(b): (_noise_power(la["metric"], float(v)) if noise_power else float(v)) for b, v in values.items()}

    specs = [LayerSpec(fqn=la["fqn"], role=la["role"], num_weights=int(la["num_weights"]),
                       act_elements=int(la.get("act_elements", 0)), macs=int(la.get("macs", 0)),
                       weight_metric=tr(la, la["weights"]),
                       act_metric=tr(la, la.get("activations") or {}) or None)
             for la in table["layers"]]
    return AllocationProblem(specs, weight_candidates={"content": wcands, "quality": wcands},
                             act_candidates={"content": acands, "quality": acands})


def plan_code_bytes(plan: Allocation | dict, shapes: dict) -> int:
    layers = plan.layers if isinstance(plan, Allocation) else plan
    return sum(code_bytes(shapes[f], b.weights) for f, b in layers.items())


def act_avg(layers: dict, problem: AllocationProblem) -> float:
    e = {la.fqn: la.act_elements for la in problem.layers}
    return sum(e[f] * b.activations for f, b in layers.items()) / sum(e.values())


def weight_avg(layers: dict, problem: AllocationProblem) -> float:
    n = {la.fqn: la.num_weights for la in problem.layers}
    return sum(n[f] * b.weights for f, b in layers.items()) / sum(n.values())


def allocate_to_bytes(problem: AllocationProblem, target: int, shapes: dict) -> tuple[Allocation, float]:
    """The allocator's plan at the largest average-bit budget whose packed codes fit in ``target`` bytes.

    The allocator's weight budget counts ``bits`` per weight, while 3-bit codes pack 10 to an int32 word
    (3.2 bits) and rows are padded to whole words; matching *exported* sizes therefore needs a search over the
    nominal budget (bisection, then the best feasible value).
    """
    lo, hi = min(WEIGHT_CANDS), max(WEIGHT_CANDS)
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        plan = solve(problem, weight_budget_bits=mid)
        if plan_code_bytes(plan, shapes) <= target:
            lo, best = mid, (plan, mid)
        else:
            hi = mid
    if best is None:
        raise RuntimeError("no plan fits the byte target")
    return best


AUTO_LABEL = "quantkit default"  # noise-energy objective, content_weight auto
SQNR_AUTO_LABEL = "SQNR-only, quantkit allocator"
CFG_AUTO_LABEL = "decoupled, guidance-direction content"  # content_metric: cfg_sqnr, default allocator


def slug(label: str) -> str:
    """A variant's file-name part: ``"MixDQ noise-power"`` -> ``"mixdq-noise-power"``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


_SCORERS: dict = {}


def plan_image_score(work: Path):
    """``Allocation -> mean PSNR`` of the analysis prompts' images (what ``content_weight: auto`` maximises);
    one scorer (one loaded model) per work folder."""
    if work not in _SCORERS:
        _SCORERS[work] = plan_scorer(make_config(), work / "job")
    return _SCORERS[work]


def random_plan(problem: AllocationProblem, rng: np.random.Generator, kind: str, fits) -> dict:
    """A random plan: each layer's bits drawn uniformly from the candidates, then repaired into the budget band.

    ``fits(layers)`` is -1 (under the band), 0 (inside) or 1 (over); the repair moves one random layer one
    candidate down (over) or up (under) until the plan lands in the band.
    """
    cands = WEIGHT_CANDS if kind == "weights" else ACT_CANDS
    for _attempt in range(100):
        choice = {la.fqn: int(rng.choice(cands)) for la in problem.layers}
        for _ in range(20000):
            layers = {f: (LayerBits(b, 8) if kind == "weights" else LayerBits(8, b)) for f, b in choice.items()}
            state = fits(layers)
            if state == 0:
                return layers
            fqns = [f for f, b in choice.items() if (b > cands[0] if state > 0 else b < cands[-1])]
            f = fqns[int(rng.integers(len(fqns)))]
            i = cands.index(choice[f])
            choice[f] = cands[i - 1] if state > 0 else cands[i + 1]
    raise RuntimeError("could not repair a random plan into the budget band")


def plan_file(work: Path, name: str, layers: dict, problem: AllocationProblem, note: str) -> Path:
    path = work / "plans" / f"{name}.yaml"
    alloc = Allocation(layers=dict(layers), roles=problem.roles, solver=note, content_weight=problem.content_weight,
                       weight_candidates=dict(problem.weight_candidates), act_candidates=dict(problem.act_candidates))
    write_plan(alloc, path)
    return path


def plan_stats(layers: dict, problem: AllocationProblem, shapes: dict) -> dict:
    hist_w: dict = {}
    hist_a: dict = {}
    for f, b in layers.items():
        r = problem.roles[f]
        hist_w.setdefault(r, {}).setdefault(str(b.weights), 0)
        hist_w[r][str(b.weights)] += 1
        hist_a.setdefault(r, {}).setdefault(str(b.activations), 0)
        hist_a[r][str(b.activations)] += 1
    return {"avg_weight_bits": round(weight_avg(layers, problem), 4),
            "avg_act_bits": round(act_avg(layers, problem), 4), "code_bytes": plan_code_bytes(layers, shapes),
            "weight_bits_per_group": hist_w,
            "act_bits_per_group": hist_a}


def run_budget(work: Path, ev: Evaluator, kind: str, budget: int, n_random: int) -> dict:
    """One budget: uniform vs MixDQ vs random plans vs SQNR-only, at equal exported size (within 1 %)."""
    shapes = layer_shapes()
    tag = f"w{budget}" if kind == "weights" else f"a{budget}"
    wc, ac = (WEIGHT_CANDS, [8]) if kind == "weights" else ([8], ACT_CANDS)
    problems = {"mixdq": problem_from(work / "sensitivity-mixdq.json", wc, ac),
                "sqnr": problem_from(work / "sensitivity-sqnr.json", wc, ac),
                "mixdq-np": problem_from(work / "sensitivity-mixdq.json", wc, ac, noise_power=True),
                "sqnr-np": problem_from(work / "sensitivity-sqnr.json", wc, ac, noise_power=True)}
    if (work / "sensitivity-cfg.json").is_file():
        problems["cfg-np"] = problem_from(work / "sensitivity-cfg.json", wc, ac, noise_power=True)
    # MixDQ as published (dB objective, fixed weighting 0.5) and its single-metric ablation; the noise-energy
    # objective at the old fixed weighting; then quantkit's default allocator (noise energy, content_weight
    # auto: the plan picked by the images of the analysis prompts) with the MixDQ table and, as the fair
    # single-metric baseline, with the SQNR-only table.
    labels = (("mixdq", "MixDQ"), ("sqnr", "SQNR-only"), ("mixdq-np", "MixDQ noise-power"))
    auto_labels = (("mixdq-np", AUTO_LABEL), ("sqnr-np", SQNR_AUTO_LABEL))
    if "cfg-np" in problems:
        auto_labels += (("cfg-np", CFG_AUTO_LABEL),)
    prob = problems["mixdq"]
    uname = f"W{budget}A8" if kind == "weights" else f"W8A{budget}"
    uniform_cfg = make_config(wbits=budget if kind == "weights" else 8, abits=8 if kind == "weights" else budget)
    uniform = ev.evaluate(f"uniform-{uname}", exported_factory(work, f"uniform-{uname}", uniform_cfg),
                          extra={"weight_bits": uniform_cfg.quantization.weights.bits,
                                 "act_bits": uniform_cfg.quantization.activations.bits})
    uniform_layers = {f: LayerBits(uniform_cfg.quantization.weights.bits, uniform_cfg.quantization.activations.bits)
                      for f in prob.fqns}
    u_code = plan_code_bytes(uniform_layers, shapes)
    u_bytes = uniform["unet_bytes"]
    fixed = u_bytes - u_code  # scales, biases, norms, activation scales: the same for every variant here
    variants: dict = {uname: {**uniform, "plan": plan_stats(uniform_layers, prob, shapes), "kind": "uniform"}}

    plans: dict = {}
    nominal: dict[int, dict] = {}  # id(allocation) -> the budget the allocator was given
    if kind == "weights":
        def budget_solve(problem):
            alloc, bits = allocate_to_bytes(problem, u_code, shapes)
            nominal[id(alloc)] = {"allocator_weight_bits_budget": round(bits, 4)}
            return alloc

        def fits(layers):
            s = fixed + plan_code_bytes(layers, shapes)
            return 1 if s > u_bytes else (-1 if s < 0.99 * u_bytes else 0)
    else:
        def budget_solve(problem):
            alloc = solve(problem, act_budget_bits=float(budget))
            nominal[id(alloc)] = {"allocator_act_bits_budget": float(budget)}
            return alloc

        def fits(layers):
            a = act_avg(layers, prob)
            return 1 if a > budget + 1e-9 else (-1 if a < 0.99 * budget else 0)
    for key, label in labels:
        alloc = budget_solve(problems[key])
        plans[label] = (alloc.layers, {**nominal[id(alloc)], "content_weight": alloc.content_weight})
    grid = make_config().allocation.content_weight_grid
    for key, label in auto_labels:
        log(f"allocate {label}: content_weight auto over {grid}")
        alloc, trials = choose_content_weight(problems[key], grid, budget_solve, plan_image_score(work))
        plans[label] = (alloc.layers, {**nominal[id(alloc)], "content_weight": alloc.content_weight,
                                       "content_weight_trials": [t.to_dict() for t in trials]})
    rng = np.random.default_rng(1234 if kind == "weights" else 4321)
    for i in range(n_random):
        plans[f"random-{i}"] = (random_plan(prob, rng, kind, fits), {"random_seed_index": i})

    for label, (layers, meta) in plans.items():
        name = f"{tag}-{slug(label)}"
        path = plan_file(work, name, layers, prob, f"benchmark:{label}")
        cfg = make_config(plan=path)
        stats = plan_stats(layers, prob, shapes)
        rec = ev.evaluate(name, exported_factory(work, name, cfg), extra={"plan": stats, **meta})
        rec["kind"] = "random" if label.startswith("random") else label
        rec["size_vs_uniform"] = round(rec["unet_bytes"] / u_bytes, 5)
        variants[label] = rec
    rand = [v for k, v in variants.items() if k.startswith("random")]
    summary = {}
    if rand:
        def ms(get):
            vals = np.array([get(v) for v in rand], dtype=np.float64)
            return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        summary = {"accuracy": {a: ms(lambda v, a=a: v["accuracy"][a]) for a in ("digit", "colour", "position", "all")},
                   "frechet": ms(lambda v: v["frechet"]), "psnr_db": ms(lambda v: v["psnr_db"]),
                   "ssim": ms(lambda v: v["ssim"]), "unet_bytes": ms(lambda v: v["unet_bytes"])}
    return {"kind": kind, "budget_bits": budget, "uniform": uname, "uniform_unet_bytes": u_bytes,
            "variants": variants, "random_summary": summary}


def run_confirm(work: Path, ev: Evaluator, budgets: dict) -> dict:
    """The budget points' uniform, MixDQ and noise-power plans with the second image seed (FP of that seed)."""
    ev.fp("fp-seed2", seed=NOISE_SEED)
    out = {}
    for key, b in budgets.items():
        tag = f"w{b['budget_bits']}" if key == "weight" else f"a{b['budget_bits']}"
        labels = (b["uniform"], "MixDQ", "MixDQ noise-power", AUTO_LABEL, SQNR_AUTO_LABEL)
        if CFG_AUTO_LABEL in b["variants"]:
            labels += (CFG_AUTO_LABEL,)
        for label in labels:
            name = f"uniform-{label}" if label == b["uniform"] else f"{tag}-{slug(label)}"
            cfg = make_config(wbits=int(label[1]), abits=int(label[3])) if label == b["uniform"] else \
                make_config(plan=work / "plans" / f"{name}.yaml")
            out[f"{key}: {label}"] = ev.evaluate(f"{name}-seed2", exported_factory(work, name, cfg), fp_key="fp-seed2",
                                                 seed=NOISE_SEED)
    return out


# -- paired statistics -----------------------------------------------------------------------------------------

PAIRS = ((AUTO_LABEL, SQNR_AUTO_LABEL), (CFG_AUTO_LABEL, SQNR_AUTO_LABEL), (AUTO_LABEL, "uniform"))
N_BOOT = 2000


def paired_stats(a: dict[str, np.ndarray], b: dict[str, np.ndarray], real_ref: np.ndarray, seed: int = 0) -> dict:
    """A vs B from the per-image outcomes saved by :meth:`Evaluator.evaluate` (see ``paired_comparison``)."""
    return paired_comparison({k[len("correct_"):]: v for k, v in a.items() if k.startswith("correct_")},
                             {k[len("correct_"):]: v for k, v in b.items() if k.startswith("correct_")},
                             a["features"], b["features"], real_ref, attributes=("digit", "all"), n_boot=N_BOOT,
                             seed=seed)


def _pooled(ev: Evaluator, pairs: list[tuple[str, str]]) -> dict:
    """Paired statistics of A vs B over several evaluations' images concatenated (``pairs`` of eval names)."""
    def cat(names: list[str]) -> dict[str, np.ndarray]:
        runs = [ev.per_image(n) for n in names]
        return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}

    return paired_stats(cat([a for a, _ in pairs]), cat([b for _, b in pairs]), ev.real_ref)


def run_paired(ev: Evaluator, budgets: dict) -> dict:
    """Paired statistics of the default plan against its baselines, per image seed and both seeds pooled."""
    out = {}
    for key, b in budgets.items():
        tag = f"w{b['budget_bits']}" if key == "weight" else f"a{b['budget_bits']}"
        for label_a, label_b in PAIRS:
            names = []
            for label in (label_a, label_b):
                label = b["uniform"] if label == "uniform" else label
                names.append(f"uniform-{label}" if label == b["uniform"] else f"{tag}-{slug(label)}")
            if any(not (ev.work / "evals" / f"{nm}-seed2-n{ev.n}.npz").is_file() for nm in names):
                continue  # no second-seed evaluation of this pair (the confirm section makes them)
            one, two = tuple(names), tuple(f"{nm}-seed2" for nm in names)
            seeds = {"seed 1": [one], "seed 2": [two], "both seeds": [one, two]}
            label_b = b["uniform"] if label_b == "uniform" else label_b
            for seed_name, pairs in seeds.items():
                log(f"paired {key}: {label_a} vs {label_b}, {seed_name}")
                out[f"{key}: {label_a} vs {label_b} ({seed_name})"] = {
                    "budget": key, "a": label_a, "b": label_b, "seeds": seed_name, **_pooled(ev, pairs)}
    return out


N_NEIGHBOURS = 8


def _eval_both_seeds(work: Path, ev: Evaluator, name: str, plan: dict) -> dict:
    """Exports ``plan`` (a plan YAML's data) as ``name`` and judges it with both image seeds (512 images)."""
    path = work / "plans" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    factory = exported_factory(work, name, make_config(plan=path))
    runs = [ev.evaluate(name, factory), ev.evaluate(f"{name}-seed2", factory, fp_key="fp-seed2", seed=NOISE_SEED)]
    return {"digit": [r["accuracy"]["digit"] for r in runs], "frechet": [r["frechet"] for r in runs],
            "digit_both_seeds": float(np.mean([r["accuracy"]["digit"] for r in runs]))}


def run_neighbourhood(work: Path, ev: Evaluator, budgets: dict) -> dict:
    """How far a plan's alignment moves under small changes that cannot lower precision.

    For the default plan and the SQNR-only plan (same allocator) of each budget: ``N_NEIGHBOURS`` random layers,
    one at a time, get one candidate step more (weights at the weight budget, activations at the activation
    budget); and, for every layer on which the two plans differ, the SQNR-only plan with that one layer set as in
    the default plan. Both image seeds each. This is the scale against which a difference between two plans'
    accuracies can be read: a neighbour has more bits than its plan, so a drop means chance, not sensitivity.
    """
    ev.fp("fp-seed2", seed=NOISE_SEED)
    out = {}
    for key, b in budgets.items():
        tag = f"w{b['budget_bits']}" if key == "weight" else f"a{b['budget_bits']}"
        side, cands = ("weights", WEIGHT_CANDS) if key == "weight" else ("activations", ACT_CANDS)
        plans = {label: yaml.safe_load((work / "plans" / f"{tag}-{slug(label)}.yaml").read_text())
                 for label in (AUTO_LABEL, SQNR_AUTO_LABEL)}
        res: dict = {"side": side}
        for label, plan in plans.items():
            both = [b["variants"][label]["accuracy"]["digit"], ev.per_image(f"{tag}-{slug(label)}-seed2")
                    ["correct_digit"].mean()]
            raisable = sorted(f for f, v in plan["layers"].items() if (v.get(side) or {}).get("bits", 99) < cands[-1])
            pick = np.random.default_rng(7).choice(raisable, size=min(N_NEIGHBOURS, len(raisable)), replace=False)
            neighbours = []
            for i, fqn in enumerate(pick):
                p = copy.deepcopy(plan)
                bits = p["layers"][fqn][side]["bits"]
                p["layers"][fqn][side]["bits"] = cands[cands.index(bits) + 1]
                log(f"neighbourhood {key}: {label} with {fqn} {side} {bits} -> {p['layers'][fqn][side]['bits']}")
                r = _eval_both_seeds(work, ev, f"nb-{tag}-{slug(label)}-{i}", p)
                neighbours.append({"layer": str(fqn), "bits": [bits, p["layers"][fqn][side]["bits"]], **r})
            nd = [n["digit_both_seeds"] for n in neighbours]
            res[label] = {"digit_both_seeds": float(np.mean(both)), "neighbours": neighbours,
                          "neighbours_digit": {"mean": float(np.mean(nd)), "min": float(np.min(nd)),
                                               "max": float(np.max(nd))}}
        a, s = plans[AUTO_LABEL]["layers"], plans[SQNR_AUTO_LABEL]["layers"]
        swaps = []
        for i, fqn in enumerate(f for f in s if a[f] != s[f]):
            p = copy.deepcopy(plans[SQNR_AUTO_LABEL])
            p["layers"][fqn] = copy.deepcopy(a[fqn])
            log(f"neighbourhood {key}: SQNR-only plan with {fqn} as in the default plan")
            r = _eval_both_seeds(work, ev, f"nb-{tag}-swap-{i}", p)
            swaps.append({"layer": fqn, "sqnr_only": s[fqn], "default": a[fqn], **r})
        res["swaps"] = swaps
        out[key] = res
    return out


# Fixed before measuring (sixteenth session), beside the main points W3 / A4; weights 2.1 and 2.25 were added
# after 2.5-3.5 gave FP-level images under both plans (no power to tell them apart), before either was measured.
SWEEP_WEIGHT_BITS = (2.1, 2.25, 2.5, 2.75, 3.5)
SWEEP_ACT_BITS = (3.5, 3.75, 4.5)
SWEEP_LABELS = (AUTO_LABEL, SQNR_AUTO_LABEL, CFG_AUTO_LABEL)


def _uniform_code_bytes(bits: float, shapes: dict) -> float:
    """Packed code bytes of uniform ``bits``, linear between the uniform integer sizes for a fractional value."""
    lo = max(b for b in WEIGHT_CANDS if b <= bits)
    hi = min(b for b in WEIGHT_CANDS if b >= bits)
    size = {b: sum(code_bytes(sh, b) for sh in shapes.values()) for b in (lo, hi)}
    return size[lo] if hi == lo else size[lo] + (bits - lo) / (hi - lo) * (size[hi] - size[lo])


def run_sweep(work: Path, ev: Evaluator, main_points: dict) -> dict:
    """The default plan vs SQNR-only through the same allocator at more budgets (fixed in advance; see the
    module docstring), with both image seeds; paired statistics per budget and pooled per kind.

    Frechet differences are per budget only (a pooled Frechet would mix different image distributions); the
    pooled digit statistics concatenate the images of every budget of the kind, the main budget point included.
    """
    ev.fp("fp-seed2", seed=NOISE_SEED)
    shapes = layer_shapes()
    grid = make_config().allocation.content_weight_grid
    out: dict = {"weight_bits": list(SWEEP_WEIGHT_BITS), "act_bits": list(SWEEP_ACT_BITS), "budgets": {},
                 "pooled": {}}
    pooled_names: dict = {}
    for kind, values in (("weights", SWEEP_WEIGHT_BITS), ("activations", SWEEP_ACT_BITS)):
        key = "weight" if kind == "weights" else "act"
        wc, ac = (WEIGHT_CANDS, [8]) if kind == "weights" else ([8], ACT_CANDS)
        tables = {AUTO_LABEL: "sensitivity-mixdq.json", SQNR_AUTO_LABEL: "sensitivity-sqnr.json",
                  CFG_AUTO_LABEL: "sensitivity-cfg.json"}
        problems = {label: problem_from(work / t, wc, ac, noise_power=True) for label, t in tables.items()
                    if (work / t).is_file()}
        main = main_points.get(key)
        if main:  # the main budget point's evaluations (made by the weight/act, confirm sections) join the pool
            tag = f"w{main['budget_bits']}" if key == "weight" else f"a{main['budget_bits']}"
            for label in problems:
                names = [f"{tag}-{slug(label)}", f"{tag}-{slug(label)}-seed2"]
                if all((work / "evals" / f"{n}-n{ev.n}.npz").is_file() for n in names):
                    pooled_names.setdefault(key, {}).setdefault(label, []).extend(names)
        for value in values:
            tag = f"sw-w{value:g}" if kind == "weights" else f"sw-a{value:g}"
            if kind == "weights":
                target = _uniform_code_bytes(value, shapes)

                def budget_solve(problem, target=target):
                    return allocate_to_bytes(problem, int(target), shapes)[0]
            else:
                def budget_solve(problem, value=value):
                    return solve(problem, act_budget_bits=float(value))
            res: dict = {"kind": kind, "bits": value, "variants": {}}
            if kind == "weights":
                res["target_code_bytes"] = int(target)
            for label, problem in problems.items():
                name = f"{tag}-{slug(label)}"
                path = work / "plans" / f"{name}.yaml"
                if path.is_file():  # allocated by an earlier run
                    plan = read_plan(path)
                    layers, meta = plan.layers, {"content_weight": plan.content_weight}
                else:
                    log(f"sweep {kind} {value:g}: allocate {label}, content_weight auto over {grid}")
                    alloc, trials = choose_content_weight(problem, grid, budget_solve, plan_image_score(work))
                    layers = alloc.layers
                    meta = {"content_weight": alloc.content_weight}
                    path = plan_file(work, name, layers, problem, f"benchmark:sweep:{label}")
                factory = exported_factory(work, name, make_config(plan=path))
                runs = [ev.evaluate(name, factory, extra={"plan": plan_stats(layers, problem, shapes), **meta}),
                        ev.evaluate(f"{name}-seed2", factory, fp_key="fp-seed2", seed=NOISE_SEED)]
                res["variants"][label] = {
                    "content_weight": runs[0].get("content_weight"), "plan": runs[0].get("plan"),
                    "unet_bytes": runs[0]["unet_bytes"],
                    "digit": [r["accuracy"]["digit"] for r in runs], "all": [r["accuracy"]["all"] for r in runs],
                    "frechet": [r["frechet"] for r in runs], "psnr_db": [r["psnr_db"] for r in runs]}
                pooled_names.setdefault(key, {}).setdefault(label, []).extend([name, f"{name}-seed2"])
            paired = {}
            for label in (AUTO_LABEL, CFG_AUTO_LABEL):
                if label in problems:
                    a, b = f"{tag}-{slug(label)}", f"{tag}-{slug(SQNR_AUTO_LABEL)}"
                    paired[f"{label} vs {SQNR_AUTO_LABEL}"] = _pooled(ev, [(a, b), (f"{a}-seed2", f"{b}-seed2")])
            res["paired"] = paired
            out["budgets"][tag] = res
    for key, by_label in pooled_names.items():
        for label in (AUTO_LABEL, CFG_AUTO_LABEL):
            if label in by_label and SQNR_AUTO_LABEL in by_label:
                pairs = list(zip(by_label[label], by_label[SQNR_AUTO_LABEL], strict=True))
                log(f"sweep pooled {key}: {label} vs {SQNR_AUTO_LABEL} over {len(pairs)} evaluations")
                st = _pooled(ev, pairs)
                st.pop("frechet", None)
                out["pooled"][f"{key}: {label} vs {SQNR_AUTO_LABEL}"] = {"evaluations": pairs, **st}
    return out


def _plan_bits(entry: dict) -> str:
    """``W8A4`` for a plan YAML's layer entry (``-`` where a side stays floating point)."""
    w, a = (entry.get("weights") or {}).get("bits", "-"), (entry.get("activations") or {}).get("bits", "-")
    return f"W{w}A{a}"


# -- BOS -------------------------------------------------------------------------------------------------------


def _text_states(pipe) -> torch.Tensor:
    from quantkit.reference.data import COLOURS, DIGIT_WORDS, POSITIONS, format_prompt

    texts = [format_prompt(d, c, p) for d in range(len(DIGIT_WORDS)) for c in range(len(COLOURS))
             for p in range(len(POSITIONS))] + [""]
    tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    with torch.inference_mode():
        return pipe.text_encoder(tok.input_ids)[0].double()


def inject_bos_outlier(pipe, ratio: float = 50.0) -> dict:
    """Give the reference model a CLIP-like BOS outlier, in place, changing what it computes as little as possible.

    The text encoder's output row 0 (the prompt-invariant BOS token) gets ``+ lam * d``, with ``d`` the unit
    direction orthogonal to the BOS row along which the other tokens vary least, and ``lam`` making the BOS row's
    absmax ``ratio`` times the other tokens' (CLIP/SDXL: about 800 vs 10-15). Every cross-attention ``to_k``/
    ``to_v`` weight becomes ``W (I - d d^T)``, so the BOS keys and values are exactly unchanged and the other
    tokens' change by ``-W d (d . x)`` (small: ``d`` is their least-variance direction); the UNet's text-pooling
    ``add_embedding`` gets the original hidden states back through a pre-hook. Returns what was measured.
    """
    h = _text_states(pipe)
    b = h[0, 0]
    x = h[:, 1:].reshape(-1, h.shape[-1])
    _, _, vh = torch.linalg.svd((b / b.norm())[None], full_matrices=True)
    q = vh[1:].T  # orthonormal basis of the complement of the BOS row
    cov = q.T @ (x.T @ x / len(x)) @ q
    evals, evecs = torch.linalg.eigh(cov)
    d = q @ evecs[:, 0]
    d = d / d.norm()
    others = float(x.abs().max())
    lam = ratio * others / float(d.abs().max())
    shift = (lam * d).float()

    def text_hook(module, args, kwargs, output):
        hs = output[0].clone()
        hs[:, 0] = hs[:, 0] + shift.to(hs.dtype)
        output["last_hidden_state"] = hs
        return output

    def pool_pre_hook(module, args):
        hs = args[0].clone()
        hs[:, 0] = hs[:, 0] - shift.to(hs.dtype)
        return (hs, *args[1:])

    pipe.text_encoder.register_forward_hook(text_hook, with_kwargs=True)
    pipe.unet.add_embedding.register_forward_pre_hook(pool_pre_hook)
    proj = torch.eye(len(d), dtype=torch.float64) - torch.outer(d, d)
    for fqn, module in pipe.unet.named_modules():
        if is_text_kv(fqn):
            module.weight.data = (module.weight.data.double() @ proj).to(module.weight.dtype)
    after = _text_states(pipe)
    return {"ratio_target": ratio, "lambda": lam, "bos_absmax": float(after[0, 0].abs().max()),
            "other_tokens_absmax": float(after[:, 1:].abs().max()), "original_bos_absmax": float(b.abs().max()),
            "original_other_tokens_absmax": others, "d_variance_of_other_tokens": float(evals[0]),
            "bos_changed": float((after[:, 0] - h[:, 0]).abs().max())}


def quantized_in_memory(config, outlier: bool, art_cache: dict):
    """FP reference pipeline (with the injected outlier if asked), calibrated and quantized in memory by ``config``.

    The outlier model cannot be exported (its hooks are not part of a diffusers folder), so this path runs the
    same library functions as ``quantkit export`` (calibrate, resolve_plan, apply_bos, quantize_denoiser) without
    writing the folder.
    """
    from quantkit.calibrate.runner import calibrate_pipeline
    from quantkit.quantize.apply import quantize_denoiser
    from quantkit.quantize.plan import apply_bos, resolve_plan

    pipe = load_fp_pipeline(MODEL["name"])
    info = inject_bos_outlier(pipe) if outlier else {}
    layers = find_layers(pipe.unet)
    selected = select_layers(layers, config.quantization.targets, config.quantization.ignore)
    key = "outlier" if outlier else "reference"
    if key not in art_cache:
        art_cache[key] = calibrate_pipeline(pipe, config.calibration, selected, f"{MODEL['name']} ({key})")
    art = art_cache[key]
    plan = resolve_plan(layers, config.quantization)
    if config.quantization.bos_aware:
        plan = apply_bos(plan, art)
    quantize_denoiser(pipe.unet, plan, art, progress=False)
    return pipe, {"injected": info, "token_report": art.token_report(),
                  "prefix_layers": sorted(f for f, s in plan.items() if s.prefix_tokens)}


def run_bos(work: Path, ev: Evaluator) -> dict:
    kv = ["re:.*attn2\\.to_(k|v)"]
    out: dict = {}
    art_cache: dict = {}

    def outlier_fp():
        pipe = load_fp_pipeline(MODEL["name"])
        info = inject_bos_outlier(pipe)
        return pipe, {"injected": info}

    out["outlier FP"] = ev.evaluate("bos-outlier-fp", outlier_fp, extra={"fidelity_vs": "reference FP"},
                                    save_as_fp="fp-outlier")
    for model, kv_set in (("reference", (4,)), ("outlier", (8, 4))):
        for kv_bits in kv_set:
            for bos in (False, True):
                over = [{"targets": kv, "weights": {"bits": 8}, "activations": {"bits": kv_bits}}]
                cfg = make_config(wbits=8, abits=8, bos=bos, overrides=over)
                name = f"bos-{model}-kvA{kv_bits}-{'aware' if bos else 'naive'}"
                if model == "reference":
                    res = ev.evaluate(name, exported_factory(work, name, cfg))
                else:
                    res = ev.evaluate(name, lambda cfg=cfg: quantized_in_memory(cfg, True, art_cache),
                                      fp_key="fp-outlier")
                out[f"{model} W8A8, to_k/to_v A{kv_bits}, {'BOS-aware' if bos else 'naive'}"] = res
    return out


# -- distributed analysis cost ---------------------------------------------------------------------------------


def run_cost(work: Path, layers: list[str], with_two_threads: bool) -> dict:
    """Analysis of ``layers`` from scratch: 1 process (1, and 2 if asked, threads) vs 2 processes (1 thread each)."""
    res_path = work / f"cost-summary-{len(layers)}.json"
    if len(layers) == len(COST_LAYERS) and (work / "cost-summary.json").is_file():
        res_path = work / "cost-summary.json"  # first version of this script's file name
    if res_path.is_file():
        return read_json(res_path)
    runs = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    configs = ((("1 process x 2 threads", 1, 2),) if with_two_threads else ()) + (
        ("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1))
    for label, nproc, threads in configs:
        wd = work / f"cost-{len(layers)}" / label.replace(" ", "_")
        if wd.exists():
            shutil.rmtree(wd)
        wd.mkdir(parents=True)
        shutil.copytree(work / "job" / "calibration", wd / "calibration")
        d = base_config()
        d["analysis"].update(layers=layers, num_threads=threads, device="cpu")
        cfg_path = wd / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(d, sort_keys=False))
        cli = ["-m", "quantkit.cli", "analyze", str(cfg_path), "--workdir", str(wd), "--no-progress"]
        cmd = ([sys.executable, *cli] if nproc == 1 else
               ["torchrun", "--standalone", f"--nproc-per-node={nproc}", *cli])
        log(f"cost: {label}: {' '.join(cmd)}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        table = read_json(wd / "analysis" / "sensitivity.json")
        runs[label] = {"wall_s": round(wall, 1), "run_seconds": table["cost"]["run_seconds"],
                       "items": table["cost"]["total_items"], "run_evaluations": table["cost"]["run_evaluations"],
                       "ranks": table["cost"]["ranks"], "values": {la["fqn"]: {"weights": la["weights"],
                                                                              "activations": la["activations"]}
                                                                  for la in table["layers"]}}
    ref = runs["1 process x 1 thread"]["values"]
    two = runs["2 processes x 1 thread"]["values"]
    max_diff = max(abs(ref[f][k][b] - two[f][k][b]) for f in ref for k in ("weights", "activations") for b in ref[f][k])
    summary = {"layers": layers, "runs": {k: {kk: vv for kk, vv in v.items() if kk != "values"}
                                          for k, v in runs.items()},
               "max_abs_diff_1proc_vs_2proc_same_threads": max_diff,
               "speedup_2proc_vs_1proc_1thread": round(runs["1 process x 1 thread"]["wall_s"]
                                                       / runs["2 processes x 1 thread"]["wall_s"], 3),
               "load_average_after": os.getloadavg()}
    if with_two_threads:
        one2 = runs["1 process x 2 threads"]["values"]
        summary["max_abs_diff_1thread_vs_2threads"] = max(abs(ref[f][k][b] - one2[f][k][b]) for f in ref
                                                          for k in ("weights", "activations") for b in ref[f][k])
        summary["speedup_2proc_vs_1proc_2threads"] = round(runs["1 process x 2 threads"]["wall_s"]
                                                           / runs["2 processes x 1 thread"]["wall_s"], 3)
    res_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# -- report ----------------------------------------------------------------------------------------------------


def _row(name: str, r: dict, size: bool = True) -> str:
    a = r["accuracy"]
    cells = [name, f"{a['digit']:.3f}", f"{a['colour']:.3f}", f"{a['position']:.3f}", f"{a['all']:.3f}",
             f"{r['frechet']:.2f}", f"{r.get('psnr_db', float('nan')):.2f}", f"{r.get('ssim', float('nan')):.4f}"]
    if size:
        cells.append(str(r.get("unet_bytes", "-")))
    return "| " + " | ".join(cells) + " |"


HEAD = "| variant | acc digit | acc colour | acc position | acc all | Frechet | PSNR vs FP (dB) | SSIM vs FP |"


def markdown(results: dict) -> str:
    lines = [f"UNet sha256 `{results['unet_sha256']}`, {results['num_images']} images per variant, 4 steps, "
             f"guidance {DEFAULT_GUIDANCE_SCALE}. Real-vs-real Frechet floor {results['frechet_real_vs_real']:.2f}; "
             f"held-out real "
             f"digit accuracy {results['heldout_real_accuracy']['digit']:.3f}.", ""]
    if "uniform" in results:
        lines += ["### Uniform naive quantization", "", HEAD + " UNet bytes |", "|" + "---|" * 9]
        lines += [_row(k, v) for k, v in results["uniform"].items()]
        lines.append("")
    for key, title in (("weight", "Weight budget"), ("act", "Activation budget")):
        if key not in results:
            continue
        b = results[key]
        lines += [f"### {title}: {b['uniform']} (equal exported UNet size within 1 %)", "",
                  HEAD + " UNet bytes | avg W bits | avg A bits |", "|" + "---|" * 11]
        for k, v in b["variants"].items():
            p = v.get("plan", {})
            lines.append(_row(k, v) + f" {p.get('avg_weight_bits', '-')} | {p.get('avg_act_bits', '-')} |")
        s = b["random_summary"]
        if s:
            acc = s["accuracy"]
            lines.append(f"| random mean +- std (n={sum(1 for k in b['variants'] if k.startswith('random'))}) | "
                         + " | ".join(f"{acc[x]['mean']:.3f} +- {acc[x]['std']:.3f}"
                                      for x in ("digit", "colour", "position", "all"))
                         + f" | {s['frechet']['mean']:.2f} +- {s['frechet']['std']:.2f} | "
                         f"{s['psnr_db']['mean']:.2f} +- {s['psnr_db']['std']:.2f} | "
                         f"{s['ssim']['mean']:.4f} +- {s['ssim']['std']:.4f} | {s['unet_bytes']['mean']:.0f} | | |")
        lines.append("")
    if "confirm" in results:
        lines += [f"### Second image seed ({NOISE_SEED} + i; fidelity against the FP images of that seed)", "",
                  HEAD + " UNet bytes |", "|" + "---|" * 9]
        fp2 = results.get("uniform", {}).get("FP (seed 2)")
        if fp2:
            lines.append(_row("FP (seed 2)", fp2))
        lines += [_row(k, v) for k, v in results["confirm"].items()]
        lines.append("")
    if results.get("paired"):
        lines += ["### Paired comparisons (the same prompts and seeds; A - B, 95 % paired bootstrap interval)", "",
                  "| budget | A vs B | images | digit acc A - B | right under A only / B only | McNemar p | "
                  "all-attributes acc A - B | Frechet A - B |", "|" + "---|" * 8]
        for v in results["paired"].values():
            d, al, f = v["digit"], v["all"], v["frechet"]
            lines.append(f"| {v['budget']} | {v['a']} vs {v['b']} ({v['seeds']}) | {v['images']} | "
                         f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
                         f"{d['a_only']} / {d['b_only']} | "
                         f"{d['p_value']:.3g} | {al['diff']:+.3f} [{al['ci95'][0]:+.3f}, {al['ci95'][1]:+.3f}] | "
                         f"{f['diff']:+.2f} [{f['ci95'][0]:+.2f}, {f['ci95'][1]:+.2f}] |")
        lines.append("")
    if results.get("neighbourhood"):
        lines += ["### Neighbourhoods: one layer one candidate step up (both image seeds, 512 images)", "",
                  "| budget | plan | digit acc | neighbours (one layer more precise): mean [min, max] |",
                  "|---|---|---|---|"]
        for key, r in results["neighbourhood"].items():
            for label in (AUTO_LABEL, SQNR_AUTO_LABEL):
                v, nd = r[label], r[label]["neighbours_digit"]
                lines.append(f"| {key} | {label} | {v['digit_both_seeds']:.3f} | {nd['mean']:.3f} "
                             f"[{nd['min']:.3f}, {nd['max']:.3f}] (n={len(v['neighbours'])}) |")
        lines += ["", "| budget | layer where the plans differ | SQNR-only plan | default plan | SQNR-only plan with "
                  "that layer as in the default: digit acc |", "|---|---|---|---|---|"]
        for key, r in results["neighbourhood"].items():
            for w in r["swaps"]:
                lines.append(f"| {key} | {w['layer']} | {_plan_bits(w['sqnr_only'])} | {_plan_bits(w['default'])} | "
                             f"{w['digit_both_seeds']:.3f} |")
        lines.append("")
    if results.get("sweep"):
        sw = results["sweep"]
        lines += ["### Budget sweep: the default plan vs SQNR-only through the same allocator (both image seeds)", "",
                  "| budget | variant | content weight | digit acc (seed 1 / seed 2) | Frechet (seed 1 / seed 2) | "
                  "UNet bytes |", "|---|---|---|---|---|---|"]
        for tag, r in sw["budgets"].items():
            for label, v in r["variants"].items():
                lines.append(f"| {tag} | {label} | {v['content_weight']} | "
                             f"{v['digit'][0]:.3f} / {v['digit'][1]:.3f} | "
                             f"{v['frechet'][0]:.2f} / {v['frechet'][1]:.2f} | {v['unet_bytes']} |")
        lines += ["", "| budget | A vs B | images | digit acc A - B | right under A only / B only | McNemar p | "
                  "Frechet A - B |", "|---|---|---|---|---|---|---|"]
        rows = [(tag, k, v) for tag, r in sw["budgets"].items() for k, v in r["paired"].items()]
        rows += [(k.split(":")[0] + " pooled", k.split(": ", 1)[1], v) for k, v in sw["pooled"].items()]
        for tag, k, v in rows:
            d, f = v["digit"], v.get("frechet")
            fr = f"{f['diff']:+.2f} [{f['ci95'][0]:+.2f}, {f['ci95'][1]:+.2f}]" if f else "-"
            lines.append(f"| {tag} | {k} | {v['images']} | {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
                         f"| {d['a_only']} / {d['b_only']} | {d['p_value']:.3g} | {fr} |")
        lines.append("")
    if "bos" in results:
        lines += ["### BOS-aware vs naive text-embedding quantization", "", HEAD, "|" + "---|" * 8]
        lines += [_row(k, v, size=False) for k, v in results["bos"].items()]
        inj = results["bos"]["outlier FP"].get("injected", {})
        if inj:
            lines.append(f"\nInjected outlier: BOS absmax {inj['bos_absmax']:.1f} vs {inj['other_tokens_absmax']:.2f} "
                         f"for the other tokens (reference model: {inj['original_bos_absmax']:.2f} vs "
                         f"{inj['original_other_tokens_absmax']:.2f}). Outlier-model rows compare with the outlier "
                         "model's own FP images.")
        lines.append("")
    if "analyze" in results:
        a = results["analyze"]
        lines += ["### Analysis cost", "", "| group | metric | layers | items | evaluations / layer | s / layer |",
                  "|---|---|---|---|---|---|"]
        for role, d in a["per_role"].items():
            lines.append(f"| {role} | {d['metric']} | {d['layers']} | {d['items']} | {d['evaluations_per_layer']} | "
                         f"{d['seconds_per_layer']} |")
        f, c = a["mixdq_first_run"], a["cached_rerun"]
        lines.append(f"\nFirst MixDQ analysis: {a['items']} items, {f['run_evaluations']} denoiser evaluations, "
                     f"{f['wall_s']} s. Cached re-run: {c['computed_items']} items computed, {c['run_evaluations']} "
                     f"evaluations, {c['wall_s']} s.")
        lines.append("")
    for key in ("cost", "cost_large"):
        if key not in results:
            continue
        c = results[key]
        lines += [f"\nSharded analysis of {len(c['layers'])} layers from scratch (2 shared cores):", "",
                  "| run | wall s | analysis s (in the process) | per-rank measuring s | items | evaluations |",
                  "|---|---|---|---|---|---|"]
        for k, v in c["runs"].items():
            ranks = " / ".join(f"{r['seconds']:.1f} ({r['items']})" for r in v["ranks"])
            lines.append(f"| {k} | {v['wall_s']} | {v['run_seconds']:.1f} | {ranks} | {v['items']} | "
                         f"{v['run_evaluations']} |")
        lines.append(f"\nMax |difference| of the sensitivity values, 1 vs 2 processes (1 thread each): "
                     f"{c['max_abs_diff_1proc_vs_2proc_same_threads']:.3g}.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [k for k in ("weight", "act") if k in results]
    if not budgets:
        return
    fig, axes = plt.subplots(len(budgets), 2, figsize=(13, 3.6 * len(budgets)), squeeze=False)
    fp = results.get("uniform", {}).get("FP")
    for row, key in enumerate(budgets):
        b = results[key]
        names, accs, fds, errs_a, errs_f = [], [], [], [], []
        for k, v in b["variants"].items():
            if k.startswith("random"):
                continue
            names.append(k)
            accs.append(v["accuracy"]["digit"])
            fds.append(v["frechet"])
            errs_a.append(0)
            errs_f.append(0)
        s = b["random_summary"]
        if s:
            names.append("random (mean)")
            accs.append(s["accuracy"]["digit"]["mean"])
            fds.append(s["frechet"]["mean"])
            errs_a.append(s["accuracy"]["digit"]["std"])
            errs_f.append(s["frechet"]["std"])
        palette = {b["uniform"]: "tab:gray", "MixDQ": "tab:green", "SQNR-only": "tab:orange",
                   "MixDQ noise-power": "tab:purple", AUTO_LABEL: "tab:red", SQNR_AUTO_LABEL: "tab:brown",
                   CFG_AUTO_LABEL: "tab:olive"}
        colours = [palette.get(n, "tab:blue") for n in names]
        for col, (vals, errs, label) in enumerate(((accs, errs_a, "digit accuracy (higher is better)"),
                                                   (fds, errs_f, "Frechet distance (lower is better)"))):
            ax = axes[row][col]
            ax.bar(range(len(names)), vals, yerr=errs, color=colours, capsize=4)
            ax.set_xticks(range(len(names)), [textwrap.fill(n, 14) for n in names], fontsize=7)
            ax.set_title(f"{'weight' if key == 'weight' else 'activation'} budget ({b['uniform']}): {label}",
                         fontsize=9)
            if fp is not None:
                ref = fp["accuracy"]["digit"] if col == 0 else fp["frechet"]
                ax.axhline(ref, color="k", ls="--", lw=1, label="FP")
                ax.legend(fontsize=8)
            if col == 0:
                ax.set_ylim(max(0.0, min(vals) - 0.1), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: dict, path: Path) -> None:
    """Digit accuracy and Frechet distance against the budget for each allocator variant (mean of both seeds)."""
    sw = results.get("sweep")
    if not sw:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    styles = {AUTO_LABEL: ("tab:red", "o", "-"), SQNR_AUTO_LABEL: ("tab:brown", "s", "--"),
              CFG_AUTO_LABEL: ("tab:olive", "^", ":")}
    fps = [results.get("uniform", {}).get(k) for k in ("FP", "FP (seed 2)")]
    fp = None if None in fps else (np.mean([f["accuracy"]["digit"] for f in fps]), np.mean([f["frechet"] for f in fps]))
    for row, (key, kind) in enumerate((("weight", "weights"), ("act", "activations"))):
        points: dict = {}
        for r in sw["budgets"].values():
            if r["kind"] == kind:
                for label, v in r["variants"].items():
                    points.setdefault(label, []).append((r["bits"], np.mean(v["digit"]), np.mean(v["frechet"])))
        main = results.get(key)
        if main:  # the main budget point (its second seed from the confirm section)
            for label in points:
                one = main["variants"].get(label)
                two = results.get("confirm", {}).get(f"{key}: {label}")
                if one and two:
                    digit = (one["accuracy"]["digit"] + two["accuracy"]["digit"]) / 2
                    points[label].append((main["budget_bits"], digit, (one["frechet"] + two["frechet"]) / 2))
        for label, pts in points.items():
            pts.sort()
            colour, marker, ls = styles.get(label, ("tab:blue", "x", "-"))
            for col in (0, 1):
                axes[row][col].plot([q[0] for q in pts], [q[1 + col] for q in pts], color=colour, marker=marker,
                                    ls=ls, label=label, alpha=0.8)
        for col, what in enumerate(("digit accuracy (higher is better)", "Frechet distance (lower is better)")):
            ax = axes[row][col]
            if fp is not None:
                ax.axhline(fp[col], color="k", ls="--", lw=1, label="FP (both seeds)")
            ax.set_xlabel(f"average {'weight' if key == 'weight' else 'activation'} bits (budget)")
            ax.set_title(what, fontsize=9)
            if col == 1:
                ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.suptitle("Budget sweep: metric-decoupled (default) vs SQNR-only plans, same allocator", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    ap.add_argument("--weight-bits", type=int, default=3, help="weight budget = uniform W<bits>A8")
    ap.add_argument("--act-bits", type=int, default=4, help="activation budget = uniform W8A<bits>")
    ap.add_argument("--random-plans", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "mixdq.json")
    ap.add_argument("--pipeline", type=Path, default=None,
                    help="another digits pipeline folder instead of the reference model (give it its own --out)")
    args = ap.parse_args(argv)
    if args.pipeline is not None:
        if not (args.pipeline / "model_index.json").is_file():
            ap.error(f"--pipeline {args.pipeline} is not a diffusers pipeline folder (no model_index.json)")
        if args.out == RESULTS / "mixdq.json":
            ap.error("--pipeline needs its own --out (benchmarks/results/mixdq.json is the reference model's)")
        MODEL.update(name=str(args.pipeline.resolve()), dir=args.pipeline.resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    sha = unet_sha256(MODEL["dir"])
    work = ROOT / "quantkit-work" / "mixdq-bench" / sha[:12]
    work.mkdir(parents=True, exist_ok=True)
    log(f"reference UNet sha256 {sha}; work folder {work}")
    results = read_json(args.out) if args.out.is_file() else {}
    if results.get("unet_sha256") != sha or results.get("num_images") != args.num_images:
        results = {}
    ev = Evaluator(work, args.num_images)
    results.update(unet_sha256=sha, num_images=args.num_images, frechet_real_vs_real=ev.floor,
                   heldout_real_accuracy=ev.real_acc, torch=torch.__version__, python=platform.python_version(),
                   cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                   settings={"steps": 4, "guidance_scale": DEFAULT_GUIDANCE_SCALE, "image_seed": IMAGE_SEED,
                             "noise_seed": NOISE_SEED,
                             "prompt_seed": PROMPT_SEED, "configs": [str(CONFIG_W.relative_to(ROOT)),
                                                                     str(CONFIG_A.relative_to(ROOT))],
                             "weight_candidates": WEIGHT_CANDS, "act_candidates": ACT_CANDS})

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(args.out)

    budget_points = (f"W{args.weight_bits}A8", f"W8A{args.act_bits}")
    if "uniform" in sections:  # the budget points last: the weight/act sections evaluate them too
        results["uniform"] = run_uniform(work, ev, skip=budget_points)
        save()
    if "analyze" in sections or "weight" in sections or "act" in sections:
        results["analyze"] = run_analysis(work)
        results["analyze_cfg"] = run_cfg_analysis(work)
        save()
    if "weight" in sections:
        results["weight"] = run_budget(work, ev, "weights", args.weight_bits, args.random_plans)
        save()
    if "act" in sections:
        results["act"] = run_budget(work, ev, "activations", args.act_bits, args.random_plans)
        save()
    if "confirm" in sections:
        results["confirm"] = run_confirm(work, ev, {k: results[k] for k in ("weight", "act") if k in results})
        save()
    if "paired" in sections:
        results["paired"] = run_paired(ev, {k: results[k] for k in ("weight", "act") if k in results})
        save()
    if "neighbourhood" in sections:
        results["neighbourhood"] = run_neighbourhood(work, ev, {k: results[k] for k in ("weight", "act")
                                                                if k in results})
        save()
    if "sweep" in sections:
        results["sweep"] = run_sweep(work, ev, {k: results[k] for k in ("weight", "act") if k in results})
        save()
    if "bos" in sections:
        results["bos"] = run_bos(work, ev)
        save()
    if "uniform" in sections:
        results["uniform"] = run_uniform(work, ev)
        save()
    if "cost" in sections:
        results["cost"] = run_cost(work, COST_LAYERS, with_two_threads=True)
        save()
        every4 = [la["fqn"] for la in read_json(work / "sensitivity-mixdq.json")["layers"]][::4]
        results["cost_large"] = run_cost(work, every4, with_two_threads=False)
        save()
    plot(results, args.out.with_suffix(".png"))
    plot_sweep(results, args.out.with_name(args.out.stem + "-sweep.png"))
    if unet_sha256(MODEL["dir"]) != sha:
        log("WARNING: the reference UNet changed during this run; re-run the script")
        results["warning"] = "reference UNet changed during the run"
        save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
