"""Where a toy model loses a shape: denoise real toy latents from step t and score what comes out.

    python bench/toy_denoise_real.py CHECKPOINT [--shape square] [--count 140] [--starts 999 599 299 199 99 49 5]
                                     [--guidance 3 1]

Draws ``--count`` toy images with the generator, every one of ``--shape``, encodes them with the
model's VAE (posterior mean), noises the latents to step t and runs DPM-Solver++(2M) from t over the
steps of the 20-step trailing grid below t (from t itself where t is below the grid: one x0
prediction). A perfect model keeps every image's colour, shape and position; the real latents,
decoded directly, score what the VAE allows. Small t tests whether the model's x0 prediction copies
an almost clean latent; t = 999 is plain sampling for these prompts.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from ldm.data.toy import SHAPES, caption, render, sample_spec
from ldm.data.transforms import to_model_range
from ldm.diffusion.denoiser import ClassifierFreeGuidance, Conditioned, Denoiser, sampling_network
from ldm.diffusion.samplers import sample_dpmpp_2m
from ldm.diffusion.timesteps import sampling_timesteps
from ldm.evaluation.toy_accuracy import score
from ldm.pipeline import pipeline_from_checkpoint, to_uint8


def toy_images(shape: str, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(count, 3, 64, 64) in [-1, 1] and their captions, every shape set to ``shape``."""
    rng = np.random.default_rng(seed)
    specs = [replace(sample_spec(rng), shape=shape) for _ in range(count)]
    pixels = np.stack([np.array(render(spec)) for spec in specs])  # (N, 64, 64, 3) uint8
    return to_model_range(torch.from_numpy(pixels).permute(0, 3, 1, 2)), [caption(s) for s in specs]


def percent(images: torch.Tensor, prompts: list[str]) -> str:
    result = score(list(to_uint8(images).numpy()), prompts)
    return "  ".join(f"{key} {100 * result[key]:5.1f}" for key in ("all", "colour", "shape", "position"))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--shape", default="square", choices=SHAPES)
    parser.add_argument("--count", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--starts", type=int, nargs="+", default=[999, 599, 299, 199, 99, 49, 5])
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 1.0])
    args = parser.parse_args()

    pipeline, _ = pipeline_from_checkpoint(args.checkpoint, use_ema=True, device="cpu")
    images, prompts = toy_images(args.shape, args.count, args.seed)
    latents = pipeline.autoencoder.scaling_factor * pipeline.autoencoder.encode(images).mode()
    print(f"{args.count} real {args.shape}s, decoded directly:  {percent(pipeline.decode(latents), prompts)}")
    context = pipeline.conditioner(prompts)
    uncond = pipeline.conditioner([""] * len(prompts))
    schedule, grid = pipeline.schedule, sampling_timesteps(pipeline.schedule.num_timesteps, 20, "trailing")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed))
    for guidance in args.guidance:
        for start in args.starts:
            network = sampling_network(pipeline.unet, schedule, pipeline.prediction_type)  # fresh per run
            if guidance == 1.0:
                model_fn = Conditioned(network, context)
            else:
                model_fn = ClassifierFreeGuidance(network, context, uncond, guidance)
            denoise = Denoiser(model_fn, schedule, pipeline.prediction_type)
            steps = grid[grid <= start] if start >= int(grid[-1]) else torch.tensor([start])
            abar = schedule.alphas_cumprod[int(steps[0])]
            x = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            out = sample_dpmpp_2m(denoise, x, steps, schedule)
            print(
                f"guidance {guidance:g}, from t = {int(steps[0]):3d} ({len(steps):2d} steps): "
                f"{percent(pipeline.decode(out), prompts)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
