"""Never lose a run: preemption signals, non-finite gradients, and the gradient norm."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ldm.errors import UserError
from ldm.training.sharding import full


class RunGuard(pl.Callback):
    """Keeps a long run safe.

    Preemption: on SIGTERM or SIGUSR1 (SLURM sends one before killing a job; torchrun forwards
    SIGTERM, and SIGUSR1 with ``--signals-to-handle``) every rank finishes its current step,
    ``checkpoints/last.ckpt`` is written, and the run exits cleanly; under SLURM with ``requeue``
    the job is then put back in the queue (after the save: requeueing ends the job), and
    ``resume=auto`` continues it.

    Numerics: when the gradients hold NaN or Inf on any rank the update is skipped on every rank
    (the decision is all-reduced: under FSDP/DeepSpeed each rank sees only its shard) and counted
    (``train/skipped_steps``); after ``max_nonfinite_in_a_row`` such steps the run stops with a
    message and a checkpoint of the last good weights. When the weights themselves turn non-finite,
    ``AtomicCheckpointIO`` refuses to save them and this guard stops the run with an error (the
    last good checkpoints stay). Also logs the total gradient norm before clipping (``train/grad_norm``).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        max_nonfinite_in_a_row: int = 20,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        requeue: bool = True,
        log_grad_norm: bool = True,
    ):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.signals = tuple(signals)
        self.requeue = requeue
        self.log_grad_norm = log_grad_norm
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.stop_reason: str | None = None
        self.weights_broke_at: int | None = None
        self._signal_received: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._saved_at: int | None = None
        self._requeue_after_save = False

    # ------------------------------------------------------------------ signals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed here, after Lightning's own handlers, so that ours decide what a signal does
        for name in self.signals:
            number = getattr(signal, name)
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()
        if (
            self._saved_at != trainer.global_step and self.weights_broke_at is None
        ):  # a finished run leaves its final state
            trainer.save_checkpoint(self.checkpoint_dir / "last.ckpt")
            self._saved_at = trainer.global_step
        if _any_rank(trainer, _refused_step(trainer) is not None)[0]:  # the final save may be the first refused
            self._weights_broke(trainer)
        if self.weights_broke_at is not None:  # every rank knows (all-reduced): all exit with the error
            raise UserError(
                f"the weights became NaN/Inf by step {self.weights_broke_at}, so nothing was saved after it: "
                f"resume from the newest checkpoint in {self.checkpoint_dir} with a lower learning rate"
            )

    def _on_signal(self, number: int, frame: Any) -> None:
        self._signal_received = signal.Signals(number).name  # acted on between steps, never mid-step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # one collective per step, so that all ranks stop together whichever got the signal (or,
        # for a refused save, whichever rank wrote: rank 0)
        received, refused = _any_rank(trainer, self._signal_received is not None, _refused_step(trainer) is not None)
        if received and self.stop_reason is None:
            self.stop_reason = f"received {self._signal_received or 'a signal on another rank'}"
            self._requeue_after_save = self.requeue and "SLURM_JOB_ID" in os.environ
        if refused:
            self._weights_broke(trainer)
        # only between optimiser steps: a resumed run restarts its data at a step boundary
        if self.stop_reason is not None and not trainer.should_stop and not trainer.fit_loop._should_accumulate():
            self._save_and_stop(trainer)

    # ------------------------------------------------------------------ numerics
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = full(torch.nn.utils.get_total_norm(grads, norm_type=2.0)) if grads else None  # (FSDP2: of every shard)
        if norm is not None and self.log_grad_norm:
            pl_module.log("train/grad_norm", norm, batch_size=1)
        # every rank takes part (even one without gradients), and any rank's NaN skips the step on
        # all: sharded strategies give each rank different gradients, and ranks that disagree diverge
        local = norm is not None and not bool(torch.isfinite(norm))
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            self.nonfinite_in_a_row = 0
            return
        for group in optimizer.param_groups:  # optimisers skip parameters without a gradient
            for p in group["params"]:
                p.grad = None
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        pl_module.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        rank_zero_warn(
            f"step {trainer.global_step}: non-finite gradients, update skipped "
            f"({self.nonfinite_in_a_row} in a row, {self.skipped_steps} in all)"
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row and self.stop_reason is None:
            self.stop_reason = (  # saved and stopped at the end of this step (on_train_batch_end)
                f"{self.nonfinite_in_a_row} steps in a row had non-finite gradients: stopping with the "
                f"last good weights (lower the learning rate, check the data, or use bf16 instead of fp16)"
            )

    # ------------------------------------------------------------------ common
    def _weights_broke(self, trainer: pl.Trainer) -> None:
        if self.weights_broke_at is None:
            refused = _refused_step(trainer)
            self.weights_broke_at = trainer.global_step if refused is None else refused
            self.stop_reason = f"step {self.weights_broke_at}: the weights hold NaN/Inf"

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        trainer.should_stop = True
        if self.weights_broke_at is not None:  # nothing to save: the last good checkpoints stay as they are
            rank_zero_info(f"{self.stop_reason}; stopping with the last good checkpoints")
            return
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes, atomically
        self._saved_at = trainer.global_step
        rank_zero_info(f"{self.stop_reason}; saved {path} at step {trainer.global_step}, stopping")
        if self._requeue_after_save and trainer.is_global_zero:
            # only now: requeueing ends this job, and an SD-size save takes tens of seconds
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
            rank_zero_info(f"requeued SLURM job {os.environ['SLURM_JOB_ID']}")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


def _refused_step(trainer: pl.Trainer) -> int | None:
    """The step whose checkpoint ``AtomicCheckpointIO`` refused to write (non-finite weights), if any."""
    return getattr(getattr(trainer.strategy, "checkpoint_io", None), "refused_step", None)


def _any_rank(trainer: pl.Trainer, *flags: bool) -> list[bool]:
    """For each flag, whether it is set on any rank: one all-reduce for all of them."""
    if trainer.world_size == 1:
        return list(flags)
    local = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
    return [bool(v > 0) for v in trainer.strategy.reduce(local, reduce_op="sum").tolist()]
