"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trained U-Net and its EMA copy.

Each U-Net residual block and spatial transformer becomes its own shard unit, then the U-Net itself
(its convolutions in and out, the embeddings). The EMA copy is sharded the same way, so its shards
line up with the U-Net's element for element and the EMA update runs on the local shards; it is
gathered only where it is used whole: a forward (validation, sample grids: every rank takes part)
and the checkpoint (Lightning's full state dict, on rank 0). The frozen VAE and text encoder are left
unsharded: they hold no gradients or optimiser state, and their forward runs outside the sharded units.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters sharded by FSDP2 (DTensors)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view of its storage), or the tensor itself."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole of a DTensor (a collective: every rank calls it), or the tensor itself."""
    dtensor = _dtensor_type()
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def shard_blocks(
    module: nn.Module, mesh: Any, block_classes: Iterable[type], reshard_after_forward: bool = True
) -> nn.Module:
    """``fully_shard`` every submodule of one of ``block_classes`` (innermost first), then ``module``."""
    from torch.distributed.fsdp import fully_shard

    classes = tuple(block_classes)
    blocks = [m for m in module.modules() if isinstance(m, classes) and m is not module]
    for block in reversed(blocks):  # (a block inside another is sharded before it)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return module


@torch.no_grad()
def local_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """The local shards of ``tensors`` (plain tensors stay as they are), for foreach updates."""
    return [local(t) for t in tensors]
