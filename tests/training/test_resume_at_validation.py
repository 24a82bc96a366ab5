"""Exact resume from a checkpoint written at a step that also validates (validation draws random
numbers: the VAE posterior's samples)."""

import torch
from omegaconf import open_dict

from train import train


def _run(train_config, out, max_steps, *extra):
    cfg = train_config(
        "~callbacks.sample_grid",
        f"trainer.max_steps={max_steps}",
        "trainer.val_check_interval=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        *extra,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return train(cfg)["task"]


def test_resume_from_a_validation_step_is_bit_identical(train_config, tmp_path):
    straight = _run(train_config, tmp_path / "straight", 4)
    _run(
        train_config,
        tmp_path / "interrupted",
        4,
        "+callbacks.stop._target_=ldm_testing.StopAfterStep",
        "+callbacks.stop.step=2",
    )
    checkpoint = tmp_path / "interrupted" / "checkpoints" / "step_0000002.ckpt"
    resumed = _run(train_config, tmp_path / "interrupted", 4, f"resume={checkpoint}")
    for name, a in straight.state_dict().items():
        assert torch.equal(a, resumed.state_dict()[name]), name
