"""Exact resume: N steps straight == N/2 steps, stop, resume from the checkpoint, N/2 steps."""

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ldm.checkpoints import load_training_checkpoint
from train import train

STEPS = 6


def _run(train_config, out: Path, max_steps: int, *extra: str):
    cfg = train_config(
        "~callbacks.sample_grid",
        f"trainer.max_steps={max_steps}",
        "data.num_workers=2",
        "callbacks.checkpoint.every_n_train_steps=3",
        *extra,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return train(cfg)


# the toy's speed-ups, whose caches start empty on resume: they must not change a bit
CACHES = ("task.channels_last=true", "task.posterior_cache_size=64", "task.context_cache_size=64")


# the toy's Muon (its filters' momentum is reshaped per matrix) and fused AdamW on every parameter, whose
# state must come back in its parameter's memory format (channels_last filters, contiguous in the file)
@pytest.mark.slow
@pytest.mark.parametrize("optim", ["muon_cosine", "adamw_cosine"])
def test_resume_is_bit_identical(train_config, tmp_path, optim):
    options = (*CACHES, f"optim={optim}")
    straight = _run(train_config, tmp_path / "straight", STEPS, *options)["task"]
    _run(
        train_config,
        tmp_path / "interrupted",
        STEPS,
        *options,
        "+callbacks.stop._target_=ldm_testing.StopAfterStep",
        f"+callbacks.stop.step={STEPS // 2}",
    )
    half = tmp_path / "interrupted" / "checkpoints" / "step_0000003.ckpt"
    assert load_training_checkpoint(half)["global_step"] == STEPS // 2
    resumed = _run(train_config, tmp_path / "interrupted", STEPS, *options, f"resume={half}")["task"]
    assert len(resumed.posterior_cache.entries) < len(straight.posterior_cache.entries)  # it did start empty

    for name, a in straight.state_dict().items():
        assert torch.equal(a, resumed.state_dict()[name]), name  # U-Net, EMA copy (and its count), frozen parts
    a = load_training_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_training_checkpoint(tmp_path / "interrupted" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_resume_auto_finds_the_newest_checkpoint(train_config, tmp_path):
    _run(train_config, tmp_path / "run", 2)
    result = _run(train_config, tmp_path / "run", 4, "resume=auto")
    assert result["trainer"].global_step == 4
