"""Precompute VAE latents and text contexts of image-caption shards (see ``ldm.data.latent_writer``).

    python data_scripts/precompute_latents.py model=sd21_base data=webdataset \
        "data.shards='/data/laion/{00000..09999}.tar'" data.image_size=512 out=/data/laion-latents
    torchrun --nproc-per-node 8 data_scripts/precompute_latents.py ...   # 8 GPUs, disjoint shards

Then train with ``data=latents data.shards=/data/laion-latents/train-*.tar data.image_size=512``
(``flips=true`` here makes ``data.random_flip=true`` possible there).
``precompute(cfg)`` is importable for tests.
"""

from __future__ import annotations

import os

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.cli import one_line_errors
from ldm.data.latent_writer import PrecomputeReport, precompute_latents
from ldm.data.shards import expand_shards
from ldm.errors import UserError
from ldm.formats import load_bundle
from ldm.formats.text_encoder import load_text_weights
from ldm.training.latent_diffusion import FROZEN


def rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's place among the precompute processes: explicit, torch.distributed, or RANK/WORLD_SIZE."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def precompute(cfg: DictConfig) -> PrecomputeReport:
    """Build the frozen VAE and text encoder of ``cfg.model`` and write this rank's latent shards."""
    rank, world_size = rank_and_world_size(cfg.rank, cfg.world_size)
    if cfg.data.get("prepare") is not None and world_size == 1:
        instantiate(cfg.data.prepare)()  # e.g. generate the toy shards (not safe from several processes)
    splits = {"train": cfg.data.get("shards"), "val": cfg.data.get("val_shards")}
    if not any(splits.values()):
        raise UserError("set data.shards (and/or data.val_shards) to the input image-caption shards")
    for spec in filter(None, splits.values()):
        expand_shards(spec)  # a wrong spec fails now, not after loading the models
    # images and captions exactly as the image datamodule validates on them (centre crop, no flip,
    # its caption keys, filters and skip rules)
    to_sample = instantiate(cfg.data, _convert_="all").val_sample
    autoencoder = instantiate(cfg.model.autoencoder)
    conditioner = instantiate(cfg.model.conditioner)
    if cfg.model.get("pretrained"):
        bundle = load_bundle(cfg.model.pretrained)
        autoencoder.load_state_dict(bundle.vae, strict=True)
        load_text_weights(conditioner, bundle.text)
    report = precompute_latents(
        autoencoder,
        conditioner,
        splits,
        cfg.out,
        image_size=cfg.data.image_size,
        to_sample=to_sample,
        store=cfg.store,
        batch_size=cfg.batch_size,
        context_dtype=cfg.context_dtype,
        device=cfg.device,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        configs={name: OmegaConf.to_container(cfg.model[name], resolve=True) for name in FROZEN},
        progress=cfg.progress,
        flips=cfg.get("flips", False),
    )
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items())) or "none"
    print(
        f"rank {rank}/{world_size}: wrote {len(report.written)} shard(s) ({report.num_samples} samples; "
        f"dropped: {dropped}), skipped {len(report.skipped)} complete shard(s) in {cfg.out}"
    )
    return report


@hydra.main(config_path="../configs", config_name="precompute", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        precompute(cfg)


if __name__ == "__main__":
    main()
