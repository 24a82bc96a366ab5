"""Checkpoint writing that a kill cannot corrupt and broken weights cannot poison."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.checkpoints import torch_save_atomic


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state_dict`` holding NaN or Inf, else None.

    Each tensor is summed in float64: a sum of finite fp32/fp16/bf16 values cannot overflow it
    (|x| < 3.4e38, so even 1e12 of them stay below 1e51), while one NaN or Inf makes the sum
    non-finite. One read of the weights, no temporary mask, and one device sync for the whole dict.
    """
    names = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not names:
        return None
    sums = torch.stack([state_dict[k].detach().sum(dtype=torch.float64).cpu() for k in names])  # (n,)
    bad = (~torch.isfinite(sums)).nonzero()
    return names[int(bad[0])] if len(bad) else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with three guarantees on every file the run writes or deletes:

    - atomic: written to a temporary name beside the target, fsynced, renamed over it (rename is
      atomic on POSIX file systems), so a process killed mid-save leaves the previous file intact;
    - finite: a checkpoint whose weights or EMA hold NaN/Inf is not written (one warning naming the
      step and tensor), and from then on nothing is deleted either, so ``last.ckpt`` and the kept
      ``step_*`` files stay the last good ones instead of rotating into broken copies;
      ``RunGuard`` sees ``refused_step`` and stops the run;
    - contained: only regular files are deleted, never a directory (restored callback state can name
      paths, see ``ldm.training.callbacks.RunCheckpoint``).

    Every write of ``ModelCheckpoint``, ``RunGuard`` and ``trainer.save_checkpoint`` goes through
    here (strategies that write sharded checkpoints themselves, FSDP's ``sharded``, bypass it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused_step: int | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            step = checkpoint.get("global_step")
            if self.refused_step is None:
                print(
                    f"warning: step {step}: {bad} holds NaN/Inf: not saving {path}; the previous "
                    f"checkpoints are kept and the run stops",
                    file=sys.stderr,
                )
            self.refused_step = int(step) if step is not None else -1
            return
        torch_save_atomic(checkpoint, Path(path))

    def remove_checkpoint(self, path: _PATH) -> None:
        if self.refused_step is not None:
            return  # the weights broke: every file already written is a good one, keep them all
        target = Path(path)
        if target.is_dir() and not target.is_symlink():
            print(f"warning: not deleting {target}: a checkpoint is a file, this is a directory", file=sys.stderr)
            return
        super().remove_checkpoint(path)
