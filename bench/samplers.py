"""Samplers on the toy: prompt accuracy against the number of steps, and sampling speed.

    python bench/samplers.py CHECKPOINT [--samplers ddim dpmpp_2m ...] [--steps 5 10 20 40]
        [--reference-steps 250] [--images-per-prompt 1] [--guidance-scale 3] [--batch-size 105]

For every sampler and step count, samples the 105 toy prompts (--images-per-prompt images each, the
same seeds for every sampler) from a trained toy CHECKPOINT and scores colour, shape and position
from the pixels (ldm/evaluation/toy_accuracy.py). The reference is DDIM (eta 0) with
--reference-steps steps. Prints a table (accuracy of all three attributes; a "*" marks the first step
count at which a sampler is within one standard error of the reference), the network evaluations
and images/s of each run, and writes --out (JSON).

    python bench/samplers.py --speed-only [--models toy small] [--speed-batch 16] [--speed-steps 20]

times sampling images/s (DPM-Solver++(2M), guidance on) for random-weight models of the toy config
and of a "small" one (the toy with a 64-channel, 2-blocks-a-level U-Net, attention at every level),
on the CPU or the GPU if present.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.data.toy import all_prompts
from ldm.evaluation.toy_accuracy import score
from ldm.pipeline import TextToImage, pipeline_from_checkpoint, to_uint8

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde")
# network evaluations per step (guidance batches cond and uncond into one call)
EVALUATIONS_PER_STEP = {"heun": 2}


def load_sampler(name: str):
    return instantiate(OmegaConf.load(ROOT / "configs" / "sampler" / f"{name}.yaml"))


def run(
    pipeline: TextToImage,
    sampler_name: str,
    steps: int,
    prompts: list[str],
    seeds: list[int],
    guidance_scale: float,
    batch_size: int,
) -> tuple[dict, float]:
    """(toy accuracy of the images, images per second) for one sampler and step count."""
    sampler = load_sampler(sampler_name)
    images = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = pipeline(prompts[i : i + batch_size], seeds[i : i + batch_size], sampler, steps, guidance_scale)
        images += [image.numpy() for image in to_uint8(batch.cpu())]  # (H, W, 3) uint8 each
    seconds = time.perf_counter() - start
    return score(images, prompts), len(images) / seconds


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def accuracy_table(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    pipeline, _ = pipeline_from_checkpoint(args.checkpoint, use_ema=True)
    base = all_prompts()
    prompts = [p for p in base for _ in range(args.images_per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    common = (prompts, seeds, args.guidance_scale, args.batch_size)

    reference, reference_rate = run(pipeline, "ddim", args.reference_steps, *common)
    print(
        f"reference ddim {args.reference_steps} steps: all {100 * reference['all']:.1f}% "
        f"({reference_rate:.1f} images/s)",
        flush=True,
    )
    results = {"reference": {"sampler": "ddim", "steps": args.reference_steps, **reference}, "runs": []}
    for name in args.samplers:
        for steps in args.steps:
            scores, rate = run(pipeline, name, steps, *common)
            evaluations = steps * EVALUATIONS_PER_STEP.get(name, 1)
            results["runs"].append(
                {"sampler": name, "steps": steps, "evaluations": evaluations, "images_per_s": rate, **scores}
            )
            print(
                f"{name:<16} {steps:>4} steps  all {100 * scores['all']:5.1f}%  "
                f"colour {100 * scores['colour']:5.1f}  shape {100 * scores['shape']:5.1f}  "
                f"position {100 * scores['position']:5.1f}  {rate:6.1f} images/s",
                flush=True,
            )
    print_table(results, args.steps, len(prompts))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict, step_counts: list[int], num_images: int) -> None:
    reference = results["reference"]["all"]
    margin = standard_error(reference, num_images)
    header = "| sampler | " + " | ".join(f"{s} steps" for s in step_counts) + " |"
    print(
        f"\naccuracy (all three attributes), {num_images} images; reference ddim "
        f"{results['reference']['steps']} steps: {100 * reference:.1f}% (* = within one standard error)"
    )
    print(header)
    print("|---" * (len(step_counts) + 1) + "|")
    for name in dict.fromkeys(r["sampler"] for r in results["runs"]):
        cells, reached = [], False
        for steps in step_counts:
            run_ = next(r for r in results["runs"] if r["sampler"] == name and r["steps"] == steps)
            mark = "*" if not reached and run_["all"] >= reference - margin else ""
            reached = reached or bool(mark)
            cells.append(f"{100 * run_['all']:.1f}{mark}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def random_pipeline(model: str, device: torch.device) -> TextToImage:
    """A random-weight pipeline of the toy config, or of the toy with a larger U-Net ("small")."""
    from hydra import compose, initialize_config_dir

    overrides = []
    if model == "small":  # the toy's VAE and text tower around a 4x larger U-Net (attention at every level)
        overrides = [
            "model.unet.model_channels=64",
            "model.unet.channel_multipliers=[1,2,4]",
            "model.unet.num_res_blocks=2",
            "model.unet.attention_resolutions=[1,2,4]",
        ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    schedule = instantiate(cfg.schedule)
    unet, vae, text = (instantiate(cfg.model[k]).to(device).eval() for k in ("unet", "autoencoder", "conditioner"))
    size = cfg.data.image_size // vae.downsampling_factor
    return TextToImage(unet, vae, text, schedule, cfg.model.prediction_type, (unet.in_channels, size, size))


def speed_table(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampler = load_sampler("dpmpp_2m")
    for model in args.models:
        pipeline = random_pipeline(model, device)
        prompts = ["a red circle in the top left"] * args.speed_batch
        seeds = list(range(args.speed_batch))
        pipeline(prompts, seeds, sampler, 2, args.guidance_scale)  # warm-up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            pipeline(prompts, seeds, sampler, args.speed_steps, args.guidance_scale)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(args.speed_batch / (time.perf_counter() - start))
        rates.sort()
        print(
            f"{model}: {rates[len(rates) // 2]:.2f} images/s (median of {args.repeats}), batch {args.speed_batch}, "
            f"{args.speed_steps} steps dpmpp_2m with guidance, {device.type}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 40])
    parser.add_argument("--reference-steps", type=int, default=250)
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=105)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_samplers.json"))
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--models", nargs="+", default=["toy", "small"], choices=["toy", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-batch", type=int, default=16)
    parser.add_argument("--speed-steps", type=int, default=20)
    args = parser.parse_args()
    if args.speed_only:
        speed_table(args)
    elif args.checkpoint is None:
        parser.error("give a toy CHECKPOINT (or --speed-only)")
    else:
        accuracy_table(args)


if __name__ == "__main__":
    main()
