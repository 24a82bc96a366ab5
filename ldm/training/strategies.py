"""Distributed strategies built from config (Hydra cannot express a plain string or a set of classes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy

from ldm.errors import UserError
from ldm.models.attention import SpatialTransformer
from ldm.models.unet import ResBlock


def auto() -> str:
    """Lightning's automatic choice: one device as is, DDP across several."""
    return "auto"


def fsdp_block_classes() -> set[type]:
    """FSDP wraps each U-Net residual block and spatial transformer as its own shard unit."""

    return {ResBlock, SpatialTransformer}


def fsdp(
    state_dict_type: str = "full",
    sharding_strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    **kwargs: Any,
):
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
    )


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure data-parallel FSDP2: one mesh dimension, every
    rank (``fsdp2`` builds it from config)."""

    shards_parameters = True  # read by the task (configure_model) and the data (equal validation batches)

    def __init__(self, reshard_after_forward: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # all ranks shard the model: data_parallel = world size, tensor_parallel = 1
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, which puts the weights into the shards and takes them out of the
        checkpoint it returns; here the hooks (``on_load_checkpoint``) still see which weights the file
        held, memory-mapped, as under every other strategy."""
        path = Path(checkpoint_path)
        if path.is_file():
            _refuse_strided(path)
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        if "state_dict" not in checkpoint and path.is_file():
            checkpoint["state_dict"] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        elif "state_dict" not in checkpoint and path.is_dir():  # a sharded checkpoint: its index names them
            from torch.distributed.checkpoint import FileSystemReader

            names = FileSystemReader(str(path)).read_metadata().state_dict_metadata
            checkpoint["state_dict"] = {k[len("state_dict.") :]: None for k in names if k.startswith("state_dict.")}
        return checkpoint


def _refuse_strided(path: Path) -> None:
    """torch 2.14's ``set_model_state_dict(broadcast_from_rank0=True)``, which Lightning loads FSDP2
    checkpoints with, hands ranks other than 0 wrong values for a tensor stored non-contiguous
    (channels_last): checkpoints of this project are written contiguous; an older one is refused."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    tensors = list(checkpoint.get("state_dict", {}).items())
    for optimizer in checkpoint.get("optimizer_states", []):
        tensors += [
            (f"optimizer state {key}", v) for state in optimizer.get("state", {}).values() for key, v in state.items()
        ]
    strided = next(
        (name for name, value in tensors if isinstance(value, torch.Tensor) and not value.is_contiguous()), None
    )
    if strided is not None:
        raise UserError(
            f"{path} holds non-contiguous (channels_last) tensors ({strided}), which strategy=fsdp2 "
            f"cannot load exactly: resume it once with strategy=ddp, whose checkpoints are contiguous"
        )


def fsdp2(
    reshard_after_forward: bool = True, save_distributed_checkpoint: bool = False, **kwargs: Any
) -> FSDP2Strategy:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``:
    the U-Net and its EMA copy sharded per ``ResBlock`` / ``SpatialTransformer`` over every rank (no
    tensor parallelism), the frozen VAE and text encoder whole on every rank. Runs on GPUs (nccl) and
    on CPUs (gloo), unlike Lightning's FSDP1 strategy (``strategy=fsdp``).

    reshard_after_forward: free each unit's gathered weights after its forward (ZeRO-3; False keeps
        them until the backward: ZeRO-2-like, more memory, one all-gather less per step).
    save_distributed_checkpoint: False (default): one consolidated ``.ckpt`` written by rank 0,
        loadable anywhere (a single device, ``ldm.convert``, ``sample.py``); True: a folder of per-rank
        shards (torch.distributed.checkpoint), faster to write at scale, loadable by this strategy.
    The sharding itself is applied by the task (``LatentDiffusion.configure_model``, ``ldm.training.sharding``).
    """
    return FSDP2Strategy(
        reshard_after_forward=reshard_after_forward, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs
    )
