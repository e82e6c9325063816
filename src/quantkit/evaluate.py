"""``quantkit eval``: FP vs quantized pipelines on the same prompts and seeds.

Metrics, per quantized pipeline:

* fidelity to FP (any pipeline): PSNR and SSIM of each image against the FP image of the same prompt and seed;
* on the built-in digits model (prompts in its grammar): alignment = judge accuracy per prompt attribute (the
  CLIP-score analogue) and quality = Frechet distance to real digits in judge features (the FID analogue),
  for the FP pipeline too, with the real-vs-real noise floor of the same number of images; and, since every
  pipeline draws the same prompts and seeds, the paired difference to FP (``vs_fp``): per attribute the
  images right under one of the two only, an exact McNemar p-value and a 95 % bootstrap interval, and the
  Frechet difference with its interval. A drop whose interval holds 0 is within the noise of this many images;
* with a CLIP model (``clip_model``, any pipeline; :mod:`quantkit.clipscore`): text alignment = CLIP score of
  each image against its prompt, for FP too, paired against FP (mean difference, 95 % bootstrap interval,
  Wilcoxon signed-rank p); and distribution shift = Frechet distance in CLIP image embeddings to the FP images,
  next to the distance between the FP images and FP images of other seeds (``clip_fd_fp_reseeded``: what
  sampling alone gives with this many images; it costs one more FP pass). Use hundreds of images for the
  distances: with fewer images than embedding dimensions they are dominated by estimation noise.

Writes ``metrics.json``, ``table.md`` and ``grid.png`` (FP row, then one row per quantized pipeline).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quantkit.clipscore import clip_scores_from_features
from quantkit.errors import QuantkitError
from quantkit.images import save_grid
from quantkit.io import atomic_output, check_output_free
from quantkit.models.pipeline import resolve_device
from quantkit.prompts import load_prompts
from quantkit.sensitivity.metrics import psnr, ssim
from quantkit.stats import frechet_distance_from_features, paired_mean_difference

__all__ = ["evaluate", "load_any_pipeline", "markdown_table"]

N_BOOT = 1000  # bootstrap resamples of the paired intervals against FP


def load_any_pipeline(spec: str, device: torch.device | str = "cpu", torch_dtype: torch.dtype | None = None):
    """A quantkit export (``quantization_config`` in a component) or any FP pipeline spec, moved to ``device``."""
    from quantkit.integrations.diffusers import _quantized_components, load_pipeline
    from quantkit.models.pipeline import load_fp_pipeline

    path = Path(spec)
    if path.is_dir() and (path / "model_index.json").is_file() and _quantized_components(path):
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        return load_pipeline(path, **kwargs).to(device)
    return load_fp_pipeline(spec, torch_dtype=torch_dtype).to(device)


def _digits_prompts(prompts: list[str]):
    """The reference model's Prompt objects when every prompt is in its grammar, else None."""
    try:
        from quantkit.reference import parse_prompt
    except ImportError:
        return None
    try:
        return [parse_prompt(p) for p in prompts]
    except ValueError:
        return None


def _is_digits(spec: str) -> bool:
    if spec == "builtin:digits":
        return True
    try:
        from quantkit.reference import DEFAULT_PIPELINE_DIR
    except ImportError:
        return False
    return Path(spec).exists() and Path(spec).resolve() == Path(DEFAULT_PIPELINE_DIR).resolve()


def _images(pipe, prompts, steps, guidance, seed, batch_size=32) -> np.ndarray:
    from quantkit.models.pipeline import generate

    starts = range(0, len(prompts), batch_size)
    out = [np.asarray(generate(pipe, prompts[i:i + batch_size], steps, guidance, seed + i))
           for i in tqdm(starts, desc="generate", unit="batch", leave=False, disable=len(starts) < 2)]
    return np.concatenate(out)


def _fd(a: np.ndarray, b: np.ndarray) -> float | None:
    """Frechet distance of two embedding sets; None (reported as "-") with fewer than two images."""
    return frechet_distance_from_features(a, b) if min(len(a), len(b)) >= 2 else None


def evaluate(reference: str, quantized: list[str], out: str | Path, prompts: str | None = None,
             num_images: int = 64, steps: int | None = None, guidance_scale: float | None = None,
             seed: int = 0, overwrite: bool = False, labels: list[str] | None = None,
             clip_model: str | None = None, device: str | None = None) -> dict:
    """Generate with fixed seeds from the FP and each quantized pipeline and compare them.

    Args:
        reference: the FP pipeline (folder, hub id or ``builtin:NAME``).
        quantized: one or more pipelines to compare (quantkit exports or any pipeline).
        out: folder for ``metrics.json``, ``table.md`` and ``grid.png``.
        prompts: a prompts file; default: the digits model's checkable prompts for the built-in model,
            COCO-style captions otherwise.
        num_images: images per pipeline (prompt ``i`` uses seed ``seed + i``).
        steps, guidance_scale: sampling settings (defaults: the digits model's, or 4 steps and the pipeline's
            default guidance).
        labels: row names for the quantized pipelines (default: their folder names).
        clip_model: a CLIP folder or hub id (safetensors) for CLIP score and CLIP Frechet distance to FP.
        device: where the pipelines (and CLIP) run: ``cpu``, ``cuda``, ``cuda:N``; None: the GPU when CUDA is
            available, else the CPU. Images are the same up to floating-point differences between devices.

    Returns:
        The metrics dictionary written to ``metrics.json``.
    """
    if not quantized:
        raise QuantkitError("give at least one --quantized pipeline to compare with the reference")
    check_output_free(out, overwrite)
    dev = resolve_device(device)
    digits_model = _is_digits(reference)
    if prompts is None:
        prompts = "builtin:digits" if digits_model else "builtin"
    texts = load_prompts(prompts, num_images)
    parsed = _digits_prompts(texts)
    if steps is None or guidance_scale is None:
        if digits_model:
            from quantkit.reference import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS

            steps = DEFAULT_NUM_STEPS if steps is None else steps
            guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        steps = 4 if steps is None else steps
    labels = labels or [Path(q).name or q for q in quantized]
    notes = []
    clip = None
    if clip_model is not None:
        from quantkit.clipscore import load_clip_scorer

        clip = load_clip_scorer(clip_model, device=dev)  # before any generation: a bad spec fails at once
        text_feats = clip.text_features(texts)
    judge = None
    if parsed is not None:
        from quantkit.reference import load_judge, real_images
        from quantkit.reference.judges import extract_features, judge_correct, paired_comparison

        judge = load_judge()
        real_ref = extract_features(real_images(parsed, "train", seed=seed + 1), judge)
        real_held = extract_features(real_images(parsed, "heldout", seed=seed + 2), judge)
    else:
        notes.append("judge metrics (alignment, Frechet distance) skipped: the prompts are not in the built-in "
                     "digits model's grammar; fidelity metrics (PSNR/SSIM vs FP) computed")

    def judged(images) -> tuple[dict, tuple[dict, np.ndarray]]:
        """Summary metrics, and the per-image outcomes (correct per attribute, judge features) behind them."""
        correct = judge_correct(images, parsed, judge)
        feats = extract_features(images, judge)
        acc = {a: float(c.mean()) for a, c in correct.items()}
        return ({"alignment": acc, "alignment_mean": float(np.mean(list(acc.values()))),
                 "frechet": frechet_distance_from_features(feats, real_ref)}, (correct, feats))

    t0 = time.perf_counter()
    rows = {}
    fp_pipe = load_any_pipeline(reference, dev)
    fp_imgs = _images(fp_pipe, texts, steps, guidance_scale, seed)
    if clip is not None:  # FP images of other seeds: the CLIP distance that sampling alone gives
        reseeded = _images(fp_pipe, texts, steps, guidance_scale, seed + len(texts))
    del fp_pipe
    results: dict = {"reference": reference, "device": str(dev), "prompts": prompts, "num_images": len(texts),
                     "steps": steps, "guidance_scale": guidance_scale, "seed": seed, "notes": notes, "pipelines": {}}
    fp_entry: dict = {}
    if judge is not None:
        summary, fp_outcomes = judged(fp_imgs)
        fp_entry.update(summary)
        results["frechet_real_vs_real"] = frechet_distance_from_features(real_held, real_ref)
    if clip is not None:
        fp_feats = clip.image_features(fp_imgs)
        fp_scores = clip_scores_from_features(fp_feats, text_feats)
        fp_entry["clip_score"] = float(fp_scores.mean())
        results["clip"] = {"model": clip.name, "reseeded_seed": seed + len(texts),
                           "fd_fp_reseeded": _fd(clip.image_features(reseeded), fp_feats)}
    results["pipelines"]["FP"] = fp_entry
    rows["FP"] = fp_imgs
    for spec, label in tqdm(list(zip(quantized, labels)), desc="eval", unit="pipeline"):
        pipe = load_any_pipeline(spec, dev)
        imgs = _images(pipe, texts, steps, guidance_scale, seed)
        del pipe
        a, b = torch.from_numpy(fp_imgs), torch.from_numpy(imgs)
        entry = {"path": spec,
                 "psnr_db": float(np.mean([psnr(x, y) for x, y in zip(a, b)])),
                 "ssim": float(np.mean([ssim(x, y) for x, y in zip(a, b)]))}
        if judge is not None:
            summary, (correct, feats) = judged(imgs)
            entry.update(summary)
            entry["vs_fp"] = paired_comparison(correct, fp_outcomes[0], feats, fp_outcomes[1], real_ref,
                                               attributes=list(correct), n_boot=N_BOOT, seed=seed)
        if clip is not None:
            feats = clip.image_features(imgs)
            scores = clip_scores_from_features(feats, text_feats)
            entry.update(clip_score=float(scores.mean()), clip_fd_vs_fp=_fd(feats, fp_feats))
            entry.setdefault("vs_fp", {})["clip_score"] = paired_mean_difference(scores, fp_scores, n_boot=N_BOOT,
                                                                                 seed=seed)
        results["pipelines"][label] = entry
        rows[label] = imgs
    results["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_output(out, overwrite=overwrite) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "table.md").write_text(markdown_table(results) + "\n")
        n = min(8, len(texts))
        save_grid([r[:n] for r in rows.values()], list(rows), tmp / "grid.png")
    return results


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: dict) -> str:
    """One row per pipeline: fidelity to FP, CLIP score and distance when measured, alignment/quality when judged."""
    judged = "alignment_mean" in results["pipelines"]["FP"]
    clip = results.get("clip")
    attrs = sorted(results["pipelines"]["FP"].get("alignment", {}))
    head = ["pipeline", "PSNR vs FP (dB)", "SSIM vs FP"]
    if clip:
        head += ["CLIP score", "CLIP FD to FP"]
    if judged:
        head += [f"acc {a}" for a in attrs] + ["acc mean", "Frechet"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in results["pipelines"].items():
        cells = [name, _fmt(e.get("psnr_db"), ".2f"), _fmt(e.get("ssim"), ".4f")]
        if clip:
            cells += [_fmt(e.get("clip_score"), ".2f"), _fmt(e.get("clip_fd_vs_fp"), ".2f")]
        if judged:
            cells += [f"{e['alignment'][a]:.3f}" for a in attrs] + [f"{e['alignment_mean']:.3f}", f"{e['frechet']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if clip:
        lines += [f"\nCLIP model {clip['model']}. CLIP FD between the FP images and FP images of other seeds "
                  f"(sampling noise at {results['num_images']} images): {_fmt(clip['fd_fp_reseeded'], '.2f')}.",
                  "", "CLIP score paired against FP (same prompts and seeds; 95 % bootstrap interval, Wilcoxon p):",
                  "", "| pipeline | CLIP score - FP | images higher here / under FP | p |", "|---|---|---|---|"]
        for name, e in results["pipelines"].items():
            c = e.get("vs_fp", {}).get("clip_score")
            if c is not None:
                lines.append(f"| {name} | {c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                             f"{c['a_higher']} / {c['b_higher']} | {c['p_value']:.3g} |")
    if judged:
        lines.append(f"\nReal-vs-real Frechet noise floor ({results['num_images']} images): "
                     f"{results['frechet_real_vs_real']:.2f}. {results['steps']} steps, seed {results['seed']}.")
        lines += ["", "Paired against FP (same prompts and seeds; 95 % bootstrap interval, exact McNemar p):", "",
                  "| pipeline | acc all - FP | right only here / only FP | p | Frechet - FP |", "|---|---|---|---|---|"]
        for name, e in results["pipelines"].items():
            if "vs_fp" not in e:
                continue
            a, f = e["vs_fp"]["all"], e["vs_fp"]["frechet"]
            lines.append(f"| {name} | {a['diff']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}] | "
                         f"{a['a_only']} / {a['b_only']} | {a['p_value']:.3g} | "
                         f"{f['diff']:+.2f} [{f['ci95'][0]:+.2f}, {f['ci95'][1]:+.2f}] |")
    for note in results["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)
