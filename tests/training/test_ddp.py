"""Two-process DDP on the CPU (gloo) through the real train.py."""

import subprocess
import sys

from ldm_testing import ROOT, TINY_MODEL, TINY_TRAINING
from ldm.checkpoints import load_training_checkpoint


def test_two_process_ddp_trains_in_step(tmp_path, toy_data_dir):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", *TINY_MODEL, *TINY_TRAINING, "~callbacks.sample_grid",
         "trainer.devices=2", "strategy=ddp", "trainer.max_steps=3", f"paths.data_dir={toy_data_dir}",
         "data.prepare.num_train=256", "data.prepare.num_val=32", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "global batch 8 = 4 per device x 1 accumulation x 2 devices" in output
    assert "U-Net weights identical on all ranks: yes" in output
    checkpoint = load_training_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    assert len(checkpoint["ldm"]["rng"]) == 2  # both ranks' generator states, for an exact resume
