"""Toy accuracy of the same diffusion samples decoded by different VAE decoders.

    python bench/toy_decoders.py --checkpoints RUN/checkpoints/last.ckpt [...] --vaes shipped NEW.safetensors [...]

For each checkpoint, samples the toy's 105 prompts x 4 images once (DPM-Solver++(2M), 20 steps,
guidance 3, EMA weights: the toy evaluation), keeps the latents, and decodes them with every VAE
given (``shipped``: the package's toy VAE; else a weights file of the same architecture, e.g. the
``autoencoder.safetensors`` of ``experiment=toy_vae_decoder``). A decoder-only fine-tune leaves the
encoder, so the latents the diffusion model was trained on, unchanged: any difference is the
decoder's. Also prints each VAE's reconstructions of the 1000 validation images, exact and with
Gaussian noise added to the latent (0.2 and 0.4 of its std), scored the same way, with PSNR.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.checkpoints import load_state_dict_file
from ldm.data.toy import all_prompts
from ldm.data.transforms import to_model_range
from ldm.diffusion.samplers import sample_dpmpp_2m
from ldm.evaluation.toy_accuracy import iter_shard_samples, score
from ldm.pipeline import pipeline_from_checkpoint, to_uint8

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGES_PER_PROMPT = 4
LATENT_NOISE = (0.0, 0.2, 0.4)


def toy_vae(weights: str) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train")
    autoencoder = instantiate(cfg.model.autoencoder).eval()
    if weights != "shipped":
        autoencoder.load_state_dict(load_state_dict_file(weights))
    return autoencoder


def as_pixels(images: torch.Tensor) -> list[np.ndarray]:
    """Decoder output (B, 3, H, W) in ~[-1, 1] -> B (H, W, 3) uint8 arrays."""
    return list(to_uint8((images + 1) / 2).numpy())


def sampled_latents(checkpoint: str) -> tuple[torch.Tensor, list[str]]:
    pipeline, _ = pipeline_from_checkpoint(checkpoint, use_ema=True, device="cpu")
    prompts = [p for p in all_prompts() for _ in range(IMAGES_PER_PROMPT)]
    latents = pipeline.sample_latents(prompts, list(range(len(prompts))), sample_dpmpp_2m, 20, 3.0)
    return latents, prompts


def validation_images(data_dir: str) -> tuple[torch.Tensor, list[str]]:
    pairs = list(iter_shard_samples(sorted(glob.glob(f"{data_dir}/val-*.tar"))))
    if not pairs:
        raise SystemExit(f"no toy validation shards in {data_dir} (run python train.py once, or make_toy_shards)")
    pixels = np.stack([np.asarray(image.convert("RGB")) for image, _ in pairs])  # (N, H, W, 3) uint8
    return to_model_range(torch.from_numpy(pixels).permute(0, 3, 1, 2)), [text for _, text in pairs]


def line(name: str, what: str, result: dict, extra: str = "") -> str:
    return (
        f"  {name:<28} {what:<22} all {100 * result['all']:5.1f}  colour {100 * result['colour']:5.1f}  "
        f"shape {100 * result['shape']:5.1f}  position {100 * result['position']:5.1f}{extra}"
    )


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", default=[])
    parser.add_argument("--vaes", nargs="+", default=["shipped"])
    parser.add_argument("--data-dir", default="data/toy", help="toy shards, for the reconstruction scores")
    args = parser.parse_args()

    samples = {Path(c).parent.parent.name + "/" + Path(c).name: sampled_latents(c) for c in args.checkpoints}
    images, captions = validation_images(args.data_dir)
    for weights in args.vaes:
        vae, name = toy_vae(weights), Path(weights).name
        print(name)
        for run, (latents, prompts) in samples.items():
            print(line(name, f"samples of {run}", score(as_pixels(vae.decode_from_latent(latents)), prompts)))
        mean = vae.encode(images).mode()
        generator = torch.Generator().manual_seed(0)  # the same noise for every VAE
        for level in LATENT_NOISE:
            noise = torch.randn(mean.shape, generator=generator)
            reconstruction = vae.decode(mean + level * mean.std() * noise)
            mse = ((reconstruction.clamp(-1, 1) - images) / 2).square().mean(dim=(1, 2, 3))
            psnr = f"  PSNR {(10 * torch.log10(1 / mse)).mean():.1f} dB"
            print(line(name, f"val recon., noise {level}", score(as_pixels(reconstruction), captions), psnr))


if __name__ == "__main__":
    main()
