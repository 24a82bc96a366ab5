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


class RunGuard(pl.Callback):
    """Keeps a long run safe.

    Preemption: on SIGTERM or SIGUSR1 (SLURM sends one before killing a job; torchrun forwards
    SIGTERM) every rank finishes its current step, ``checkpoints/last.ckpt`` is written, and the run
    exits cleanly; under SLURM with ``requeue`` the job is put back in the queue, and
    ``resume=auto`` continues it.

    Numerics: when the (already all-reduced) gradients hold NaN or Inf the update is skipped (the
    gradients are dropped before the optimiser sees them) and counted (``train/skipped_steps``);
    after ``max_nonfinite_in_a_row`` such steps the run stops with a message and a checkpoint of
    the last good weights. Also logs the total gradient norm before clipping (``train/grad_norm``).
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
        self._signal_received: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._saved_at: int | None = None

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
        if self._saved_at != trainer.global_step:  # a finished run always leaves its final state
            trainer.save_checkpoint(self.checkpoint_dir / "last.ckpt")
            self._saved_at = trainer.global_step

    def _on_signal(self, number: int, frame: Any) -> None:
        self._signal_received = signal.Signals(number).name  # acted on between steps, never mid-step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # one collective per step, so that all ranks stop together whichever got the signal
        received = trainer.strategy.reduce_boolean_decision(self._signal_received is not None, all=False)
        if received and self.stop_reason is None:
            self.stop_reason = f"received {self._signal_received or 'a signal on another rank'}"
            if self.requeue and "SLURM_JOB_ID" in os.environ and trainer.is_global_zero:
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        # only between optimiser steps: a resumed run restarts its data at a step boundary
        if self.stop_reason is not None and not trainer.should_stop and not trainer.fit_loop._should_accumulate():
            self._save_and_stop(trainer)

    # ------------------------------------------------------------------ numerics
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if self.log_grad_norm:
            pl_module.log("train/grad_norm", norm, batch_size=1)
        if bool(torch.isfinite(norm)):
            self.nonfinite_in_a_row = 0
            return
        for group in optimizer.param_groups:  # optimisers skip parameters without a gradient
            for p in group["params"]:
                p.grad = None
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        pl_module.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        rank_zero_warn(f"step {trainer.global_step}: non-finite gradients, update skipped "
                       f"({self.nonfinite_in_a_row} in a row, {self.skipped_steps} in all)")  # fmt: skip
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row and self.stop_reason is None:
            self.stop_reason = (  # saved and stopped at the end of this step (on_train_batch_end)
                f"{self.nonfinite_in_a_row} steps in a row had non-finite gradients: stopping with the "
                f"last good weights (lower the learning rate, check the data, or use bf16 instead of fp16)"
            )

    # ------------------------------------------------------------------ common
    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes, atomically
        self._saved_at = trainer.global_step
        trainer.should_stop = True
        rank_zero_info(f"{self.stop_reason}; saved {path} at step {trainer.global_step}, stopping")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
