"""The user's path, end to end, on a full-size SD-Turbo-architecture pipeline with random weights (no download).

Builds a StableDiffusionPipeline folder with the SD 2.1 / SD-Turbo UNet (866M parameters), an OpenCLIP-H-shaped
text encoder (23 layers, width 1024) and the SD VAE, all random; exports it with the shipped configs
(``configs/sd-turbo-{w8a8,w4a8,w4a16}.yaml``, unchanged except for a 2-prompt calibration), then runs
``quantkit bench`` on the FP folder and the exports: each pipeline loaded with ``DiffusionPipeline.from_pretrained``
(through ``quantkit.load_pipeline``) in its own process, its UNet timed on the inputs of a real first step.
This is the check that an exported folder, loaded as a user loads it, runs as fast as the in-memory quantized
model of ``benchmarks/unet.py``.

    PYTHONPATH=src python benchmarks/user_bench.py [--work DIR] [--steps 3]   # about 20 min on the 2-core CPU

Then, since whole-step times on a shared machine drift by 10 % and more between processes, the same UNets are
timed in one process, in turn, on the same inputs (``interleaved``).

Writes ``benchmarks/results/user-bench-cpu.json`` (the bench results, export sizes and timings) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("w8a8", "w4a8", "w4a16")


def build_pipeline(folder: Path) -> Path:
    """A random full-size SD-Turbo-architecture pipeline (fp32 safetensors), built once."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from quantkit.models.architectures import build_denoiser
    from quantkit.models.tokenizer import write_clip_tokenizer
    from quantkit.testing.tiny import TINY_WORDS

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ids = write_clip_tokenizer(tmp / "tokenizer", TINY_WORDS, model_max_length=77)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=ids["vocab_size"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"], hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, projection_dim=1024, hidden_act="gelu"))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=768)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="trailing", prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=build_denoiser("sd-turbo"), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def interleaved(fp: Path, exports: dict[str, Path], rounds: int) -> dict:
    """In one process: the FP UNet and each export's UNet (``UNet2DConditionModel.from_pretrained`` after
    ``import quantkit``), called in turn on the same real inputs, ``rounds`` times; medians and ratios to FP."""
    import statistics

    from diffusers import UNet2DConditionModel

    import quantkit  # noqa: F401  (registers the loader)
    from quantkit.models.pipeline import generate

    pipe = quantkit.load_pipeline(next(iter(exports.values())))  # any pipeline: the inputs of its first step
    cap: dict = {}
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: cap.setdefault("c", (a, k)), with_kwargs=True)
    generate(pipe, ["a photograph of an astronaut riding a horse"], 1, 0.0, 0, output_type="latent")
    hook.remove()
    del pipe
    args, kwargs = cap["c"]
    models = {"FP": UNet2DConditionModel.from_pretrained(str(fp / "unet"), use_safetensors=True).eval()}
    for name, path in exports.items():
        models[name] = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet").eval()
    times: dict = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():
            m(*args, **kwargs)
        for _ in range(rounds):
            for n, m in models.items():
                t = time.perf_counter()
                m(*args, **kwargs)
                times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"rounds": rounds, "step_s": times, "median_s": med,
            "speedup_vs_fp": {n: med["FP"] / v for n, v in med.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "quantkit-work" / "user-bench")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--rounds", type=int, default=2, help="quantkit bench rounds (alternating order)")
    ap.add_argument("--interleaved-rounds", type=int, default=4,
                    help="rounds of the one-process comparison (0 skips it)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "user-bench-cpu.json")
    args = ap.parse_args()

    from quantkit import stages
    from quantkit.bench import bench, markdown_table
    from quantkit.config import parse_config

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp = build_pipeline(args.work / "sd-turbo-random")
    report: dict = {"build_seconds": round(time.perf_counter() - t0, 1), "exports": {}}
    exports = []
    for scheme in args.schemes.split(","):
        data = yaml.safe_load((ROOT / "configs" / f"sd-turbo-{scheme}.yaml").read_text())
        data["model"] = str(fp)
        data["calibration"].update(num_prompts=2, batch_size=2)
        cfg = parse_config(data)
        out = args.work / f"sd-turbo-{scheme}"
        t = time.perf_counter()
        if not (out / "model_index.json").is_file():
            stages.calibrate(cfg, args.work / f"work-{scheme}")
            stages.export(cfg, out, args.work / f"work-{scheme}", overwrite=True)
        unet_bytes = sum(f.stat().st_size for f in (out / "unet").glob("*.safetensors"))
        report["exports"][scheme] = {"export_seconds": round(time.perf_counter() - t, 1), "unet_bytes": unet_bytes}
        exports.append(str(out))
    fp_unet = sum(f.stat().st_size for f in (fp / "unet").glob("*.safetensors"))
    report["fp_unet_bytes_fp32"] = fp_unet
    res = bench(str(fp), exports, device="cpu", steps=args.steps, warmup=1, batch_size=1, guidance_scale=0.0,
                rounds=args.rounds, labels=[f"sd-turbo-{s}" for s in args.schemes.split(",")])
    report["bench"] = res
    print(markdown_table(res))
    if args.interleaved_rounds:
        inter = interleaved(fp, {f"sd-turbo-{s}": Path(e) for s, e in zip(args.schemes.split(","), exports)},
                            args.interleaved_rounds)
        report["interleaved"] = inter
        med, speed = inter["median_s"], inter["speedup_vs_fp"]
        print("one process, interleaved: " + ", ".join(f"{n} {med[n]:.2f} s ({speed[n]:.2f}x)" for n in med))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["exports"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
