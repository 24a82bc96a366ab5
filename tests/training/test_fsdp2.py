"""strategy=fsdp2 on two CPU ranks (gloo): the U-Net and its EMA sharded, the frozen parts whole;
trains what DDP trains, samples grids, resumes bit-identically, and writes a checkpoint that a single
device and ``ldm.convert`` read like any other."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import assert_same_training, rank_jobs, straight_and_resumed

from ldm.checkpoints import load_training_checkpoint, submodule_state
from ldm.convert import main as convert
from ldm.pipeline import pipeline_from_checkpoint
from ldm_testing import TINY_MODEL, TINY_TRAINING

EPOCH = [
    "data.num_workers=1",
    "data.samples_per_epoch=64",
    "trainer.max_steps=10",
    "callbacks.checkpoint.every_n_train_steps=3",
]


@pytest.mark.slow
def test_fsdp2_trains_like_ddp_samples_resumes_exactly_and_checkpoints_load_anywhere(tmp_path, toy_data_dir):
    # Muon needs whole weight matrices (it refuses sharded strategies): AdamW here
    common = [
        *TINY_MODEL,
        *TINY_TRAINING,
        "trainer.devices=2",
        "optim=adamw_cosine",
        *EPOCH,
        f"paths.data_dir={toy_data_dir}",
        "data.prepare.num_train=256",
        "data.prepare.num_val=32",
    ]
    fsdp2 = [*common, "strategy=fsdp2"]
    jobs = straight_and_resumed(tmp_path, "fsdp2", fsdp2)
    jobs[1]["overrides"].append("~callbacks.sample_grid")
    jobs.append({"out": str(tmp_path / "ddp"), "overrides": [*common, "strategy=ddp", "~callbacks.sample_grid"]})
    outputs = rank_jobs(tmp_path, jobs)

    assert outputs[0].count("U-Net weights sharded over 2 ranks (FSDP2)") == 2
    assert "cannot be continued" not in outputs[0] + outputs[1]
    straight = assert_same_training(tmp_path, "fsdp2")  # resumed at step 6, bit-identical at step 10
    # the same training as DDP, up to the order of the gradient sums (reduce-scatter vs all-reduce)
    ddp = load_training_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert straight["state_dict"].keys() == ddp["state_dict"].keys()
    for key, value in ddp["state_dict"].items():
        torch.testing.assert_close(straight["state_dict"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    # the grid sampled by both ranks from the sharded EMA, written by rank 0
    assert (tmp_path / "fsdp2" / "straight" / "samples" / "step_0000010.png").is_file()

    # the checkpoint is a plain full state dict: a single device builds the pipeline from it...
    path = tmp_path / "fsdp2" / "straight" / "checkpoints" / "last.ckpt"
    pipeline, _ = pipeline_from_checkpoint(str(path))
    ema = submodule_state(straight["state_dict"], "ema.module.")
    assert all(torch.equal(value, ema[key]) for key, value in pipeline.unet.state_dict().items())
    images = pipeline(["a red circle in the top left"], [0], pipeline_sampler(), 2, 3.0)
    assert images.shape[0] == 1 and torch.isfinite(images).all()
    # ...and ldm.convert exports it
    convert([str(path), str(tmp_path / "model.safetensors"), "--to", "sd"])
    exported = load_file(str(tmp_path / "model.safetensors"))
    unet = submodule_state(exported, "model.diffusion_model.")
    assert len(unet) == len(ema)


def pipeline_sampler():
    from hydra.utils import instantiate

    from ldm_testing import compose_config

    return instantiate(compose_config("train", []).sampler)
