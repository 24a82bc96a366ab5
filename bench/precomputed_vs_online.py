"""Training-step time: on-the-fly encoding (VAE + text encoder + U-Net) vs the posterior cache vs precomputed latents.

    python bench/precomputed_vs_online.py [--batch 16] [--repeats 9] [--device cpu|cuda] [--bf16] [override ...]

The task is built from the real configs (``configs/train.yaml``; default the toy model at 64 px, with
its shipped VAE; Hydra overrides such as ``model=sd21_base data.image_size=256`` pick another).
Both paths run the same ``LatentDiffusion`` (same U-Net, optimiser, EMA) on the same batch: toy
images and captions, or the latents and contexts encoded from them once, as ``data=latents`` feeds
them; the cached path is on-the-fly encoding with ``task.posterior_cache_size`` on and every image
of the batch already seen (a toy run's batches from about its second pass over the data: the VAE
is skipped, the image hash and posterior draw are not). A step is ``encode_batch`` + loss +
backward + AdamW + EMA update. The paths are timed in turn in one process, the order reversed every
repeat (medians; read the ratios, these machines are noisy). Excluded: data loading, and the
precomputed path's posterior draw z = mean + std * eps, which the loader workers do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.data.toy import caption, render, sample_spec
from ldm.data.transforms import ImageTransform
from ldm.training.caches import PosteriorCache

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build_task(overrides: list[str], device: torch.device):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config={}).to(device)
    return task.train(), cfg


def toy_batch(size: int, batch: int, device: torch.device) -> dict[str, Any]:
    """Toy images (B, 3, size, size) in [-1, 1] and their captions."""
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(batch)]
    transform = ImageTransform(size)
    images = torch.stack([transform(render(spec)) for spec in specs]).to(device)
    return {"image": images, "caption": [caption(spec) for spec in specs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="the toy experiment's batch size")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast the step as bf16-mixed does (VAE stays fp32)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml")
    args = parser.parse_args()

    device = torch.device(args.device)
    task, cfg = build_task(args.overrides, device)
    optimizer = task.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    images = toy_batch(cfg.data.image_size, args.batch, device)
    latents, context = task.encode_batch(images, drop_captions=False)
    warm_cache = task.posterior_cache = PosteriorCache(args.batch)
    task.encode_batch(images, drop_captions=False)  # fills it through the training path
    paths = {  # name -> (batch, posterior cache)
        "online": (images, PosteriorCache(0)),
        "cached": (images, warm_cache),
        "precomputed": ({"latent": latents, "context": context, "caption": images["caption"]}, PosteriorCache(0)),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step(name: str) -> None:
        batch, task.posterior_cache = paths[name]
        with autocast:
            loss = task.diffusion_loss(*task.encode_batch(batch, drop_captions=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if task.ema is not None:
            task.ema.update_parameters(task.unet)

    def timed(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in paths:  # warm-up (allocator, kernels, oneDNN primitives)
        timed(name), timed(name)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        order = list(paths) if repeat % 2 == 0 else list(paths)[::-1]  # alternate: load drift hits both
        for name in order:
            times[name].append(timed(name))

    sizes = {
        name: sum(p.numel() for p in getattr(task, name).parameters()) / 1e6
        for name in ("unet", "autoencoder", "conditioner")
    }
    print(
        f"model {cfg.model.get('family', '?')} ({', '.join(f'{k} {v:.1f}M' for k, v in sizes.items())}), "
        f"{cfg.data.image_size} px -> latents {tuple(latents.shape[1:])}, batch {args.batch}, {device}"
        f"{', bf16' if args.bf16 else ', fp32'}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        print(
            f"  {name:<12} {median * 1000:9.1f} ms/step  {args.batch / median:8.1f} images/s  "
            f"(min {min(times[name]) * 1000:.1f}, max {max(times[name]) * 1000:.1f})"
        )
    print(
        f"  ratio online/cached: {medians['online'] / medians['cached']:.2f}, "
        f"online/precomputed: {medians['online'] / medians['precomputed']:.2f}"
    )


if __name__ == "__main__":
    main()
