"""Distributed strategies built from config (Hydra cannot express a plain string or a set of classes)."""

from __future__ import annotations

from typing import Any


def auto() -> str:
    """Lightning's automatic choice: one device as is, DDP across several."""
    return "auto"


def fsdp_block_classes() -> set[type]:
    """FSDP wraps each U-Net residual block and spatial transformer as its own shard unit."""
    from ldm.models.attention import SpatialTransformer
    from ldm.models.unet import ResBlock

    return {ResBlock, SpatialTransformer}


def fsdp(state_dict_type: str = "full", sharding_strategy: str = "FULL_SHARD", cpu_offload: bool = False,
         activation_checkpointing: bool = False, **kwargs: Any):
    """Lightning's FSDPStrategy sharding the U-Net at block level.

    The frozen VAE and text encoder hold no gradients, so they are outside the optimiser whatever
    FSDP does with them; ``use_orig_params`` lets frozen and trained parameters share a unit.
    ``state_dict_type``: "full" (one consolidated checkpoint, loadable anywhere) or "sharded"
    (a folder of per-rank shards, much faster to save at scale).
    """
    from pytorch_lightning.strategies import FSDPStrategy

    blocks = fsdp_block_classes()
    return FSDPStrategy(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        use_orig_params=True,
        **kwargs,
    )  # fmt: skip
