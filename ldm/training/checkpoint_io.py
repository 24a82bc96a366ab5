"""Checkpoint writing that a kill cannot corrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.checkpoints import torch_save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but every file is written to a temporary name beside the
    target, fsynced, then renamed over it: a process killed mid-save leaves the previous
    checkpoint intact (rename is atomic on POSIX file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        torch_save_atomic(checkpoint, Path(path))
