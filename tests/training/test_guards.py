"""Never lose a run: non-finite steps are skipped, SIGTERM checkpoints, a killed save is harmless."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ldm.checkpoints import load_training_checkpoint, torch_save_atomic
from ldm.training.guards import RunGuard
from ldm.training.latent_diffusion import LatentDiffusion
from ldm_testing import ROOT
from train import train


def _nan_on_calls(monkeypatch, calls):
    original = LatentDiffusion.diffusion_loss
    counter = {"n": 0}

    def diffusion_loss(self, latents, context, sample_weights=None):
        counter["n"] += 1
        loss = original(self, latents, context, sample_weights)
        return loss * float("nan") if counter["n"] in calls else loss

    monkeypatch.setattr(LatentDiffusion, "diffusion_loss", diffusion_loss)


def _guard(trainer) -> RunGuard:
    return next(c for c in trainer.callbacks if isinstance(c, RunGuard))


def test_non_finite_step_is_skipped_and_counted(train_config, monkeypatch):
    _nan_on_calls(monkeypatch, {2})
    result = train(train_config("~callbacks.sample_grid"))
    guard = _guard(result["trainer"])
    assert guard.skipped_steps == 1 and guard.stop_reason is None
    assert result["trainer"].global_step == 4
    assert all(torch.isfinite(p).all() for p in result["task"].unet.parameters())


def test_too_many_non_finite_steps_stop_with_last_good_weights(train_config, monkeypatch):
    _nan_on_calls(monkeypatch, set(range(1, 100)))
    cfg = train_config("~callbacks.sample_grid", "callbacks.guard.max_nonfinite_in_a_row=2", "trainer.max_steps=50")
    result = train(cfg)
    trainer = result["trainer"]
    assert "non-finite" in _guard(trainer).stop_reason
    assert trainer.global_step == 2
    checkpoint = load_training_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_sigterm_checkpoints_and_resume_continues(train_config, caplog):
    # a real SIGTERM to this process at step 3 (in-process: a fresh interpreter would spend ~10 s importing)
    cfg = train_config(
        "~callbacks.sample_grid",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint.every_n_train_steps=1000",
        "+callbacks.preemption._target_=ldm_testing.SignalAtStep",
        "+callbacks.preemption.step=3",
    )
    reached_outside = []  # a SIGTERM the guard does not take must fail this test, not kill pytest

    def fallback(*args):
        reached_outside.append(args)

    handler_before = signal.signal(signal.SIGTERM, fallback)
    try:
        with caplog.at_level("INFO"):
            stopped_at = train(cfg)["trainer"].global_step
        assert signal.getsignal(signal.SIGTERM) is fallback  # the guard put the previous handler back
    finally:
        signal.signal(signal.SIGTERM, handler_before)
    assert not reached_outside
    assert "received SIGTERM" in caplog.text
    run = Path(cfg.paths.output_dir)
    assert load_training_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == stopped_at
    assert 3 <= stopped_at <= 4  # the step that got the signal finishes, nothing after it

    resumed = train_config(
        "~callbacks.sample_grid",
        "resume=auto",
        f"trainer.max_steps={stopped_at + 2}",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint.every_n_train_steps=1000",
    )
    assert train(resumed)["trainer"].global_step == stopped_at + 2
    assert load_training_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == stopped_at + 2


KILLED_WRITER = """
import os, sys, torch
from ldm.checkpoints import torch_save_atomic
def partial_save(obj, f):
    with open(f, "wb") as handle:
        handle.write(b"half a checkpoint")
        handle.flush()
        os._exit(9)  # killed in the middle of writing
torch.save = partial_save
torch_save_atomic({"weights": torch.ones(3)}, sys.argv[1])
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    torch_save_atomic({"weights": torch.zeros(3)}, path)
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT)
    assert result.returncode == 9
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.zeros(3))
    assert oct(path.stat().st_mode & 0o777) != "0o600"


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_guard_restores_previous_signal_handlers():
    guard = RunGuard(checkpoint_dir="/tmp/unused")
    before = signal.getsignal(signal.SIGUSR1)

    class FakeTrainer:
        global_step = 0
        world_size = 1
        strategy = None  # no checkpoint IO: nothing refused
        saved = []

        def save_checkpoint(self, path):
            self.saved.append(path)

    guard.on_train_start(FakeTrainer(), None)
    assert signal.getsignal(signal.SIGUSR1) == guard._on_signal
    guard.on_train_end(FakeTrainer(), None)
    assert signal.getsignal(signal.SIGUSR1) == before
    assert [p.name for p in FakeTrainer.saved] == ["last.ckpt"]  # a finished run leaves its final state


FAKE_SCONTROL = """#!/bin/sh
# records what the guard asked for and whether last.ckpt was already written at that moment
if [ -f "$CHECKPOINT" ]; then state=written; else state=missing; fi
echo "$* last.ckpt=$state" >> "$RECORD"
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals and shell scripts")
def test_preempted_slurm_job_saves_before_it_requeues(train_config, tmp_path, monkeypatch):
    # requeueing ends the job: the checkpoint must be on disk before scontrol runs
    cfg = train_config(
        "~callbacks.sample_grid",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint.every_n_train_steps=1000",  # no periodic last.ckpt to mislead
        "+callbacks.preemption._target_=ldm_testing.SignalAtStep",
        "+callbacks.preemption.step=2",
        "+callbacks.preemption.signal_name=SIGUSR1",
    )
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("RECORD", str(record))
    monkeypatch.setenv("CHECKPOINT", str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"))
    stopped_at = train(cfg)["trainer"].global_step
    assert record.read_text().splitlines() == ["requeue 4242 last.ckpt=written"]
    assert (
        load_training_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["global_step"] == stopped_at
    )


class NanGradientOnRank(pl.Callback):
    """Makes one gradient NaN on one rank only, after DDP's all-reduce (as a rank's own shard would be
    under FSDP/DeepSpeed), at optimiser step ``step``; runs first among the callbacks."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)  # before RunGuard's on_before_optimizer_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            next(p for p in pl_module.unet.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path, toy_data_dir):
    from ldm_testing import TINY_MODEL, TINY_TRAINING, launch_ranks

    run = tmp_path / "run"
    outputs = launch_ranks(
        [
            sys.executable,
            "train.py",
            *TINY_MODEL,
            *TINY_TRAINING,
            "~callbacks.sample_grid",
            "trainer.devices=2",
            "strategy=ddp",
            "trainer.max_steps=3",
            f"paths.data_dir={toy_data_dir}",
            "data.prepare.num_train=256",
            "data.prepare.num_val=32",
            f"hydra.run.dir={run}",
            "+callbacks.nan._target_=test_guards.NanGradientOnRank",
            "+callbacks.nan.rank=1",
            "+callbacks.nan.step=1",
        ],
        ROOT,
        env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "training"), str(ROOT / "tests")])},
    )
    assert "step 1: non-finite gradients, update skipped" in outputs[0]  # rank 0 (its own gradients finite) skipped too
    assert "U-Net weights identical on all ranks: yes" in outputs[0]
