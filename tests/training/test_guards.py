"""Never lose a run: non-finite steps are skipped, SIGTERM checkpoints, a killed save is harmless."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_testing import ROOT
from ldm.checkpoints import load_training_checkpoint, torch_save_atomic
from ldm.training.guards import RunGuard
from ldm.training.latent_diffusion import LatentDiffusion
from train import train


def _nan_on_calls(monkeypatch, calls):
    original = LatentDiffusion.diffusion_loss
    counter = {"n": 0}

    def diffusion_loss(self, latents, context):
        counter["n"] += 1
        loss = original(self, latents, context)
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
    cfg = train_config("~callbacks.sample_grid", "trainer.max_steps=100000", "trainer.val_check_interval=1000",
                       "callbacks.checkpoint.every_n_train_steps=1000",
                       "+callbacks.preemption._target_=ldm_testing.SignalAtStep", "+callbacks.preemption.step=3")
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

    resumed = train_config("~callbacks.sample_grid", "resume=auto", f"trainer.max_steps={stopped_at + 2}",
                           "trainer.val_check_interval=1000", "callbacks.checkpoint.every_n_train_steps=1000")
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
        saved = []

        def save_checkpoint(self, path):
            self.saved.append(path)

    guard.on_train_start(FakeTrainer(), None)
    assert signal.getsignal(signal.SIGUSR1) == guard._on_signal
    guard.on_train_end(FakeTrainer(), None)
    assert signal.getsignal(signal.SIGUSR1) == before
    assert [p.name for p in FakeTrainer.saved] == ["last.ckpt"]  # a finished run leaves its final state
