"""The ``quantkit`` command line: each command is a thin layer over a function of :mod:`quantkit.stages`."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from quantkit.errors import QuantkitError

__all__ = ["main", "cli"]

_EPILOG_RUN = """\b
Examples:
  quantkit run configs/demo.yaml
  quantkit run configs/sd-turbo-w8a8.yaml --model ./sd-turbo --out ./sd-turbo-w8a8
"""


def _load(config: str, model: str | None):
    from quantkit.config import load_config

    overrides = {"model": model} if model else None
    return load_config(config, overrides)


class _Group(click.Group):
    """Turns :class:`QuantkitError` into one line on stderr and its exit code, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QuantkitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to PIL without torchvision.

    transformers prints it whenever diffusers resolves a pipeline's component classes, on every command, though
    quantkit loads no image processor; every other transformers message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


_TORCHVISION_NOTICE_FILTER = _NoTorchvisionFallbackNotice()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantkit")
def cli():
    """quantkit: quantize diffusers text-to-image pipelines (calibrate -> export -> load)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("transformers.utils.import_utils").addFilter(_TORCHVISION_NOTICE_FILTER)


class _ContentWeight(click.ParamType):
    """``auto`` or a number (range checked by the config)."""

    name = "auto|FLOAT"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, float):
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)


class _Sweep(click.ParamType):
    """``KIND=V1,V2,...``: one allocation budget and the values a Pareto sweep gives it."""

    name = "KIND=V1,V2,..."

    def convert(self, value, param, ctx):
        from quantkit.allocate import SWEEP_KINDS

        if isinstance(value, tuple):
            return value
        kind, sep, rest = value.partition("=")
        if not sep or kind not in SWEEP_KINDS:
            self.fail(f"{value!r} is not KIND=V1,V2,... with KIND one of {', '.join(SWEEP_KINDS)} "
                      "(e.g. weight_bits=2,3,4)", param, ctx)
        try:
            values = tuple(float(v) for v in rest.split(",") if v.strip())
        except ValueError:
            self.fail(f"{rest!r} is not a comma-separated list of numbers (e.g. weight_bits=2,3,4)", param, ctx)
        if not values:
            self.fail(f"{value!r} gives no values (e.g. {kind}=2,3,4)", param, ctx)
        return kind, values


_model_opt = click.option("--model", help="Pipeline folder or hub id; overrides the config's model.")
_workdir_opt = click.option("--workdir", type=click.Path(file_okay=False),
                            help="Work folder for artifacts [default: quantkit-work/<config name>].")
_out_opt = click.option("--out", type=click.Path(file_okay=False),
                        help="Output pipeline folder [default: quantkit-out/<config name>].")
_overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")


@cli.command(epilog=_EPILOG_RUN)
@click.argument("config", type=click.Path())
@_model_opt
@_out_opt
@_workdir_opt
@_overwrite_opt
def run(config, model, out, workdir, overwrite):
    """Run every stage of CONFIG: calibrate, export, reload and evaluate against FP."""
    from quantkit import stages

    cfg = _load(config, model)
    workdir, out = stages.default_paths(config, workdir, out)
    metrics = stages.run(cfg, out, workdir, overwrite=overwrite)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"exported pipeline: {out}\nmetrics: {workdir / 'metrics.json'}\nimage grid: {workdir / 'grid.png'}")


@cli.command(epilog="\b\nExample:\n  quantkit calibrate configs/demo.yaml --workdir work/demo\n")
@click.argument("config", type=click.Path())
@_model_opt
@_workdir_opt
@click.option("--force", is_flag=True, help="Recalibrate even when a matching calibration exists.")
def calibrate(config, model, workdir, force):
    """Record layer input statistics and denoiser I/O of CONFIG's pipeline over its prompts."""
    from quantkit import stages

    cfg = _load(config, model)
    workdir, _ = stages.default_paths(config, workdir, None)
    folder = stages.calibrate(cfg, workdir, force=force)
    click.echo(f"calibration: {folder}")


@cli.command(epilog="""\b
Examples:
  quantkit analyze configs/demo.yaml
  torchrun --nproc-per-node 2 -m quantkit.cli analyze configs/demo.yaml   # layers sharded over 2 processes
""")
@click.argument("config", type=click.Path())
@_model_opt
@_workdir_opt
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def analyze(config, model, workdir, no_progress):
    """Per-layer, per-bit sensitivity of CONFIG's pipeline (MixDQ metric-decoupled): JSON table + plot."""
    from quantkit import stages

    cfg = _load(config, model)
    workdir, _ = stages.default_paths(config, workdir, None)
    path = stages.analyze(cfg, workdir, progress=not no_progress)
    import os

    if os.environ.get("RANK", "0") == "0":
        click.echo(f"sensitivity table: {path}\nplot: {path.with_suffix('.png')}")


@cli.command(epilog="""\b
Examples:
  quantkit allocate configs/digits-mixdq-w3.yaml --weight-bits 3 --act-bits 8
  quantkit allocate configs/sdxl-turbo-w8a8.yaml --weight-mb 1200 --protect-top 1
  quantkit allocate configs/digits-mixdq-w3.yaml --sweep weight_bits=2.25,2.5,3,4
""")
@click.argument("config", type=click.Path())
@_model_opt
@_workdir_opt
@click.option("--weight-bits", type=float, help="Budget: parameter-weighted average weight bits.")
@click.option("--weight-mb", type=float,
              help="Budget: MiB the allocated layers store, scales included (instead of --weight-bits).")
@click.option("--act-bits", type=float, help="Budget: activation-weighted average activation bits.")
@click.option("--max-bops", type=float, help="Compute budget: MACs x weight bits x activation bits per step.")
@click.option("--protect-top", type=float, help="Keep this percent of the most sensitive layers per group in FP16.")
@click.option("--content-weight", type=_ContentWeight(),
              help="Weight of content (SSIM) vs quality (SQNR) layers, 0-1, or 'auto' (pick by images).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Plan file [default: WORKDIR/plan.yaml].")
@click.option("--sweep", type=_Sweep(),
              help="Pareto sweep instead of one plan: one plan per value of one budget, e.g. weight_bits=2,2.5,3,4 "
                   "(kinds: weight_bits, weight_mb, act_bits, max_bops), into WORKDIR/sweep-KIND with a table and "
                   "a plot.")
def allocate(config, model, workdir, weight_bits, weight_mb, act_bits, max_bops, protect_top, content_weight,
             plan_path, sweep):
    """Pick per-layer bit-widths under a budget (MixDQ integer program) from the sensitivity table."""
    from quantkit import stages

    if sweep and plan_path:
        raise click.UsageError("--plan names one plan; a --sweep writes one plan per value into WORKDIR/sweep-KIND")

    if weight_bits is not None and weight_mb is not None:
        raise click.UsageError("give --weight-bits or --weight-mb, not both")
    from quantkit.config import AllocationSettings

    overrides = {"allocation.act_bits": act_bits, "allocation.max_bops": max_bops,
                 "allocation.protect_top_percent": protect_top, "allocation.content_weight": content_weight}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for kind, value in (("weight_bits", weight_bits), ("weight_mb", weight_mb)):
        if value is not None:  # replaces the config's weight budget of the other kind
            overrides.update({f"allocation.{k}": v for k, v in AllocationSettings.budget_update(kind, value).items()})
    if model:
        overrides["model"] = model
    from quantkit.config import load_config

    cfg = load_config(config, overrides)
    workdir, _ = stages.default_paths(config, workdir, None)
    if sweep:
        path = stages.allocate_sweep(cfg, workdir, *sweep)
        heads = ("budget", "avg W bits", "weight MiB", "avg A bits", "objective", "image PSNR")
        click.echo(f"{heads[0]:>12}  " + "  ".join(f"{h:>10}" for h in heads[1:]) + "  plan")
        for row in json.loads(path.read_text())["values"]:
            if "infeasible" in row:
                click.echo(f"{row['value']:>12g}  infeasible: {row['infeasible']}")
                continue
            a = row["achieved"]
            act = f"{a['act_bits']:.3f}" if a["act_bits"] is not None else "-"
            psnr = f"{row['image_psnr_db']:.2f} dB" if row.get("image_psnr_db") is not None else "-"
            click.echo(f"{row['value']:>12g}  {a['weight_bits']:>10.3f}  {a['weight_mb']:>10.3f}  {act:>10}  "
                       f"{row['objective']:>10.4f}  {psnr:>10}  {row['plan']}")
        click.echo(f"sweep: {path}\nplot: {path.with_suffix('.png')}")
        return
    path = stages.allocate(cfg, workdir, plan_path)
    click.echo(path.read_text())
    click.echo(f"plan: {path}\nplot: {path.with_suffix('.png')}")


@cli.command(epilog="\b\nExample:\n  quantkit export configs/demo.yaml --out out/demo-w8a8\n"
                    "  quantkit export configs/demo.yaml --plan quantkit-work/demo/plan.yaml --out out/mixed\n")
@click.argument("config", type=click.Path())
@_model_opt
@_out_opt
@_workdir_opt
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="Bit plan from quantkit allocate (overrides quantization.plan).")
@_overwrite_opt
def export(config, model, out, workdir, plan_path, overwrite):
    """Quantize CONFIG's pipeline and write it as a diffusers folder with packed weights."""
    from quantkit import stages
    from quantkit.config import load_config

    overrides = {"model": model} if model else {}
    if plan_path:
        if not Path(plan_path).is_file():
            raise QuantkitError(f"plan file not found: {plan_path}")
        overrides["quantization.plan"] = plan_path
    cfg = load_config(config, overrides)
    workdir, out = stages.default_paths(config, workdir, out)
    path = stages.export(cfg, out, workdir, overwrite=overwrite)
    click.echo(f"exported pipeline: {path}")


@cli.command(epilog="\b\nExample:\n  quantkit inspect quantkit-out/demo\n")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(path, as_json):
    """Per-layer table of an exported pipeline: role, shape, format, bits per weight, bytes."""
    from quantkit import stages

    if not Path(path).exists():
        raise QuantkitError(f"path not found: {path}")
    info = stages.inspect_export(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rows = info["layers"]
    w = max([len(r["name"]) for r in rows] + [5])
    click.echo(f"{'layer':<{w}}  {'role':<7}  {'shape':<20}  {'format':<10}  {'bits/w':>6}  {'bytes':>10}")
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        click.echo(f"{r['name']:<{w}}  {r['role']:<7}  {shape:<20}  {r['format']:<10}  "
                   f"{r['bits_per_weight']:>6.2f}  {r['bytes']:>10,}")
    t = info["totals"]
    click.echo(f"\n{t['layers']} quantized layers; component {t['bytes']:,} bytes vs {t['fp16_bytes']:,} at FP16 "
               f"(ratio {t['ratio_vs_fp16']:.3f})")


@cli.command(name="eval", epilog="""\b
Examples:
  quantkit eval --reference builtin:digits --quantized out/w8a8 --quantized out/w4a8 --out eval/
  quantkit eval --reference ./sd-turbo --quantized ./sd-turbo-w8a8 --prompts prompts.txt --steps 1 --out eval/
  quantkit eval --reference stabilityai/sd-turbo --quantized ./sd-turbo-w8a8 --steps 1 --guidance-scale 0 \\
      --num-images 256 --clip-model openai/clip-vit-large-patch14 --out eval/   # + CLIP score and CLIP FD
""")
@click.option("--reference", required=True, help="The floating-point pipeline (folder, hub id or builtin:NAME).")
@click.option("--quantized", "quantized", multiple=True, required=True,
              help="A pipeline to compare; repeat for several (one table).")
@click.option("--prompts", help="Prompts file, one a line [default: the model's built-in prompts].")
@click.option("--num-images", default=64, show_default=True, type=click.IntRange(1))
@click.option("--steps", type=click.IntRange(1), help="Sampling steps [default: 4, the digits model's default].")
@click.option("--guidance-scale", type=float, help="Classifier-free guidance [default: the pipeline's].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--clip-model", help="A CLIP model (folder or hub id, safetensors) for text alignment (CLIP score, "
              "paired against FP) and the Frechet distance to FP in CLIP image embeddings, e.g. "
              "openai/clip-vit-large-patch14.")
@click.option("--device", help="Where the pipelines run: cpu, cuda, cuda:N [default: the GPU when CUDA is "
              "available, else the CPU].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_overwrite_opt
def eval_cmd(reference, quantized, prompts, num_images, steps, guidance_scale, seed, clip_model, device, out,
             overwrite):
    """Compare pipelines with FP: PSNR/SSIM, CLIP score and distance with --clip-model, and alignment + Frechet
    distance on the digits model."""
    from quantkit.evaluate import evaluate, markdown_table

    results = evaluate(reference, list(quantized), out, prompts, num_images, steps, guidance_scale, seed, overwrite,
                       clip_model=clip_model, device=device)
    click.echo(markdown_table(results))
    click.echo(f"\nwritten: {out}/metrics.json, {out}/table.md, {out}/grid.png")


@cli.command(epilog="""\b
Examples:
  quantkit bench --reference builtin:digits --quantized quantkit-out/demo --batch-size 8
  quantkit bench --reference stabilityai/sd-turbo --quantized ./sd-turbo-w8a8 --height 512 --guidance-scale 0 \\
      --out bench-sd-turbo/
  quantkit bench --reference ./sdxl --quantized ./sdxl-w8a8 --device cuda --dtype float16 --steps 50
""")
@click.option("--reference", required=True, help="The floating-point pipeline (folder, hub id or builtin:NAME).")
@click.option("--quantized", "quantized", multiple=True, required=True,
              help="A pipeline to compare; repeat for several (one table).")
@click.option("--device", help="cpu, cuda, cuda:N [default: the GPU when CUDA is available, else the CPU].")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1), help="Timed denoiser calls.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0), help="Untimed calls first.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1), help="Prompts per call.")
@click.option("--height", type=click.IntRange(8), help="Image height [default: the pipeline's].")
@click.option("--width", type=click.IntRange(8), help="Image width [default: --height, else the pipeline's].")
@click.option("--guidance-scale", type=float, help="Classifier-free guidance [default: the pipeline's]; above 1 "
              "doubles the denoiser's batch.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Load every pipeline in this dtype [default: as stored]; float16 is the usual GPU baseline.")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads [default: torch's].")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1),
              help="Measure every pipeline this many times in alternating order (against a drifting machine).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for bench.json and table.md.")
@_overwrite_opt
def bench(reference, quantized, device, steps, warmup, batch_size, height, width, guidance_scale, dtype, threads,
          rounds, out, overwrite):
    """Time one denoiser step and measure memory of FP and quantized pipelines on this machine, each in its own
    process."""
    from quantkit.bench import bench as run_bench
    from quantkit.bench import markdown_table

    results = run_bench(reference, list(quantized), out, device=device, steps=steps, warmup=warmup,
                        batch_size=batch_size, height=height, width=width, guidance_scale=guidance_scale,
                        dtype=dtype, threads=threads, rounds=rounds, overwrite=overwrite)
    click.echo(markdown_table(results))
    if out:
        click.echo(f"\nwritten: {out}/bench.json, {out}/table.md")


@cli.command()
def doctor():
    """Show versions, CPU features and which native kernels are active (reference ops otherwise)."""
    import platform

    import diffusers
    import torch

    from quantkit import __version__
    from quantkit.ops import cuda_status, native

    st = native.native_status()
    click.echo(f"quantkit {__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
               f"python {platform.python_version()} on {platform.machine()}")
    click.echo(f"CUDA available: {torch.cuda.is_available()}")
    if st["loaded"]:
        click.echo(f"native library: {st['path']}")
        click.echo(f"CPU features: {st.get('cpu_features', {})}")
        kernels = st.get("cpu_kernels", [])
        click.echo(f"ops with a native CPU kernel ({len(kernels)}): {', '.join(kernels) or 'none'}")
        compact_on = os.environ.get("QUANTKIT_COMPACT", "1") != "0"
        click.echo("loading on the CPU: " + ("W8/W4 layers compacted to the kernels' tile layout (one copy of each "
                                             "weight; QUANTKIT_COMPACT=0 turns this off)" if compact_on else
                                             "canonical codes kept, tile layout cached beside them "
                                             "(QUANTKIT_COMPACT=0)"))
    else:
        click.echo(f"native kernels: not active ({st['error']}); every op runs its plain-PyTorch reference")
    cst = cuda_status()
    if cst["loaded"]:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        click.echo(f"CUDA kernels: {cst['path']} ({gpu})")
        click.echo(f"ops with a CUDA kernel: {', '.join(native.kernel_ops('CUDA')) or 'none'}")
        if torch.cuda.is_available():
            from quantkit.ops import cuda, resident

            bits = "/".join(f"W{b}" for b in resident.compact_bits())
            ok = cuda.resident_ok(torch.device("cuda"))
            click.echo("on this GPU: " + (f"{bits} layers with activations compacted to the resident layout of the "
                                          "Triton kernels (QUANTKIT_COMPACT=0 turns this off)" if ok else
                                          "canonical codes (the resident layout needs Triton and an sm_90+ GPU)"))
            if ok:
                from quantkit.ops import triton_gemm

                w4 = ("widened per call to run the 8-bit kernels" if triton_gemm.w4_expand_selected()
                      else "on the 4-bit kernels")
                from quantkit.nn.fuse import auto_fuse_selected, groupnorm_selected

                fused = "GEGLU, q/k/v projections" + (", GroupNorms" if groupnorm_selected() else "")
                if torch.cuda.get_device_capability() == (9, 0):
                    from quantkit.ops import cutlass_gemm

                    click.echo(f"8-bit linears (static activations): {cutlass_gemm.describe()} (QUANTKIT_INT8_GEMM)")
                click.echo(f"4-bit layers: {w4} (QUANTKIT_TRITON_W4); loaded exports "
                           + (f"fuse {fused} with the quantization at the first GPU call" if auto_fuse_selected()
                              else "are not fused (QUANTKIT_FUSE=0)") + " (csrc/README.md)")
    else:
        click.echo(f"CUDA kernels: not active ({cst['error']})")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="quantkit")


if __name__ == "__main__":
    main()
