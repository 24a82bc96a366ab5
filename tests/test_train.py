"""train.py end to end on the real configs, shrunk (tests/conftest.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoints import load_training_checkpoint
from train import train

ROOT = Path(__file__).resolve().parents[1]


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


def test_missing_shards_fail_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", f"data.shards='{tmp_path}/nothing-{{000..009}}.tar'", "logger=csv",
         f"hydra.run.dir={tmp_path}/run", "data.prepare=null", "model.autoencoder.path=null"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert lines and "nothing-" in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_unknown_config_key_is_reported(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "max_stepz" in result.stderr
    assert "Traceback" not in result.stderr
