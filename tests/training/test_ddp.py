"""Two DDP ranks on the CPU (gloo) through the real train.py: in step, and resumed deep into an epoch
bit-identically, on image shards and on precomputed latent shards."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from latent_corpus import latent_meta, write_latent_shard

from ldm.checkpoints import load_training_checkpoint
from ldm_testing import ROOT, TINY_MODEL, TINY_TRAINING, launch_ranks

# 8 batches per rank and epoch (64 samples / (2 ranks x 2 workers x 4) per worker, x 2 workers): a run
# of 10 steps resumed at step 6 restarts 6 batches into epoch 0 and crosses into epoch 1
EPOCH = [
    "data.num_workers=2",
    "data.samples_per_epoch=64",
    "trainer.max_steps=10",
    "callbacks.checkpoint.every_n_train_steps=3",
]
RESUME_AT = 6


def rank_jobs(tmp_path, jobs: list[dict]) -> list[str]:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    return launch_ranks(
        [sys.executable, str(ROOT / "tests" / "training" / "rank_jobs.py"), str(path)], ROOT, timeout=600
    )


def straight_and_resumed(tmp_path, name: str, overrides: list[str]) -> list[dict]:
    """A run of the whole length, and one resumed from its step-``RESUME_AT`` checkpoint."""
    straight, resumed = tmp_path / name / "straight", tmp_path / name / "resumed"
    checkpoint = straight / "checkpoints" / f"step_{RESUME_AT:07d}.ckpt"
    return [
        {"out": str(straight), "overrides": overrides},
        {"out": str(resumed), "overrides": [*overrides, f"resume={checkpoint}"]},
    ]


def assert_same_training(tmp_path, name: str) -> dict:
    a = load_training_checkpoint(tmp_path / name / "straight" / "checkpoints" / "last.ckpt")
    b = load_training_checkpoint(tmp_path / name / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{name}: {key}"  # U-Net, EMA (and its count)
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    return a


@pytest.mark.slow
def test_two_ddp_ranks_train_in_step_and_resume_exactly_on_images_and_latents(tmp_path, toy_data_dir):
    latents = tmp_path / "latent_shards"
    latents.mkdir()
    meta = latent_meta(latent_shape=(4, 16, 16), context_shape=(77, 32), image_size=32)
    for split, counts in (("train", (30, 45, 21)), ("val", (20,))):
        for index, count in enumerate(counts):
            write_latent_shard(
                latents / f"{split}-{index:06d}.tar", [f"{split}{index}-{j:03d}" for j in range(count)], meta
            )
    common = [
        *TINY_MODEL,
        *TINY_TRAINING,
        "~callbacks.sample_grid",
        "trainer.devices=2",
        "strategy=ddp",
        *EPOCH,
        f"paths.data_dir={toy_data_dir}",
    ]
    images = [*common, "data.prepare.num_train=256", "data.prepare.num_val=32"]
    on_latents = [
        *common,
        "data=latents",
        f"data.shards={latents}/train-*.tar",
        f"data.val_shards={latents}/val-*.tar",
        "data.check_model=false",
        "data.random_flip=true",
    ]
    outputs = rank_jobs(
        tmp_path,
        straight_and_resumed(tmp_path, "images", images) + straight_and_resumed(tmp_path, "latents", on_latents),
    )

    assert "global batch 8 = 4 per device x 1 accumulation x 2 devices" in outputs[0]
    assert outputs[0].count("U-Net weights identical on all ranks: yes") == 4
    assert "cannot be continued" not in outputs[0] + outputs[1]  # every resume was exact, none restarted its data
    for name in ("images", "latents"):
        checkpoint = assert_same_training(tmp_path, name)
        assert len(checkpoint["ldm"]["rng"]) == 2  # both ranks' generator states
        position = checkpoint["LatentShardDataModule" if name == "latents" else "ShardDataModule"]
        assert [rank["epoch"] for rank in position["ranks"]] == [1, 1]  # 10 steps of 8-batch epochs
        assert all(len(rank["workers"]) == 2 for rank in position["ranks"])
        assert position["ranks"][0]["workers"] != position["ranks"][1]["workers"]
