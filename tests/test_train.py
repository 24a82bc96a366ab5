"""train.py end to end on the real configs, shrunk (tests/conftest.py)."""

import json
from pathlib import Path

import pytest
import torch

from ldm.checkpoints import load_training_checkpoint
from ldm.cli import one_line_errors
from ldm_testing import compose_config, run_script
from train import train


def test_train_writes_checkpoint_config_and_samples(train_config):
    cfg = train_config()
    result = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"]
    assert json.loads(grids[-1].with_suffix(".json").read_text())["rows"] == ["a red circle in the top left"]
    assert result["trainer"].global_step == 4
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))

    checkpoint = load_training_checkpoint(run / "checkpoints" / "last.ckpt")  # weights_only=True inside
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("ema.module.") for k in keys)
    assert checkpoint["ldm"]["config"]["model"]["unet"]["model_channels"] == 32
    assert checkpoint["global_step"] == 4


def test_checkpoints_keep_the_newest_and_every_milestone(train_config):
    cfg = train_config(
        "~callbacks.sample_grid",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.checkpoint.save_top_k=2",
        "callbacks.checkpoint_milestones.every_n_train_steps=3",
    )
    train(cfg)
    names = sorted(p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir())
    assert names == [
        "last.ckpt",
        "milestone_0000003.ckpt",
        "milestone_0000006.ckpt",
        "step_0000005.ckpt",
        "step_0000006.ckpt",
    ]


def test_trains_without_a_logger(train_config):
    # logger=none: callbacks that only report to a logger (DeviceStatsMonitor) must not stop the run
    cfg = train_config("~callbacks.sample_grid", "trainer.max_steps=2", "logger=none")  # after TINY_TRAINING's csv
    assert train(cfg)["trainer"].global_step == 2


def test_missing_shards_fail_with_one_line(train_config, tmp_path, capsys):
    cfg = train_config(f"data.shards='{tmp_path}/nothing-{{000..009}}.tar'", "data.prepare=null")
    with pytest.raises(SystemExit) as exit_info, one_line_errors():  # what main() wraps train() in
        train(cfg)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: no shard found for '{tmp_path}/nothing-{{000..009}}.tar'"


def test_missing_resume_checkpoint_is_one_line(train_config, tmp_path, capsys):
    with pytest.raises(SystemExit), one_line_errors():
        train(train_config(f"resume={tmp_path}/nope.ckpt"))
    assert capsys.readouterr().err.strip() == f"error: resume checkpoint not found: {tmp_path}/nope.ckpt"


def test_unknown_config_key_is_reported(tmp_path, capsys):
    assert run_script("train.py", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}/run") != 0
    stderr = capsys.readouterr().err
    assert "max_stepz" in stderr
    assert "Traceback" not in stderr


def test_a_run_ending_between_checkpoints_leaves_one_last_checkpoint(train_config):
    # the run guard saves the final step; the checkpoint callback must not add a last-v1.ckpt beside it
    cfg = train_config("~callbacks.sample_grid", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=500")
    train(cfg)
    directory = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt"]
    assert load_training_checkpoint(directory / "last.ckpt")["global_step"] == 3


def test_first_stage_run_exports_the_autoencoder_with_its_scaling_factor(tmp_path, toy_data_dir):
    from safetensors import safe_open

    cfg = compose_config(
        "train",
        [
            "experiment=toy_vae",
            "model.autoencoder.module.channel_multipliers=[1,1]",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
            "data.image_size=32",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu",
            "optim.lr_scheduler.schedule.warmup_steps=1",
            "logger=csv",
            "callbacks.export.scaling_batches=2",
            "task.equivariance_weight=0.5",
        ],
    )
    cfg.paths.output_dir, cfg.paths.data_dir = str(tmp_path / "run"), str(toy_data_dir)
    cfg.data.prepare.num_train, cfg.data.prepare.num_val = 256, 32  # the session's toy data, as train_config has it
    train(cfg)
    with safe_open(str(tmp_path / "run" / "autoencoder.safetensors"), "pt") as exported:
        assert float(exported.metadata()["scaling_factor"]) > 0
        assert "encoder.conv_in.weight" in exported.keys()


def test_decoder_fine_tuning_run_keeps_the_shipped_encoder_and_scaling_factor(tmp_path, toy_data_dir):
    from safetensors import safe_open

    from ldm.checkpoints import load_state_dict_file

    cfg = compose_config(
        "train",
        [
            "experiment=toy_vae_decoder",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
            "data.image_size=32",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu",
            "logger=csv",
            "callbacks.export.scaling_batches=1",
        ],
    )
    cfg.paths.output_dir, cfg.paths.data_dir = str(tmp_path / "run"), str(toy_data_dir)
    cfg.data.prepare.num_train, cfg.data.prepare.num_val = 256, 32  # the session's toy data, as train_config has it
    train(cfg)
    exported_path = str(tmp_path / "run" / "autoencoder.safetensors")
    shipped, exported = load_state_dict_file(cfg.model.autoencoder.path), load_state_dict_file(exported_path)
    for name, value in exported.items():
        assert torch.equal(value, shipped[name]) == name.startswith(("encoder.", "quant_conv.")), name
    with safe_open(exported_path, "pt") as opened:
        assert float(opened.metadata()["scaling_factor"]) == pytest.approx(cfg.model.autoencoder.module.scaling_factor)
