"""sample.py on a tiny checkpoint trained by train.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose_config
from ldm.errors import UserError
from sample import sample
from train import train


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, toy_data_dir):
    from omegaconf import open_dict

    from conftest import TINY_MODEL, TINY_TRAINING

    run = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", [*TINY_MODEL, *TINY_TRAINING, "~callbacks.sample_grid", "trainer.max_steps=2"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
        cfg.paths.data_dir = str(toy_data_dir)
        cfg.data.prepare.num_train, cfg.data.prepare.num_val = 256, 32
    train(cfg)
    return run / "checkpoints" / "last.ckpt"


def _sample_config(checkpoint, out_dir, *overrides):
    return compose_config(
        "sample",
        [f"checkpoint={checkpoint}", f"out_dir={out_dir}", "steps=3", "num_images_per_prompt=2", "batch_size=3", *overrides],
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_sample_writes_images_metadata_and_grid(tiny_checkpoint, tmp_path, sampler):
    rows = sample(_sample_config(tiny_checkpoint, tmp_path, "prompt='a red circle in the top left'", f"sampler={sampler}"))
    assert [r["file"] for r in rows] == ["00000.png", "00001.png"]
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert lines == rows
    assert {"file", "prompt", "seed", "sampler", "steps", "guidance_scale"} <= set(lines[0])
    assert lines[0]["sampler"] == sampler and [r["seed"] for r in lines] == [0, 1]
    image = Image.open(tmp_path / "00000.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert (tmp_path / "grid.png").is_file()


def test_same_seed_same_images_whatever_the_batch(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\na blue square in the center\n")
    sample(_sample_config(tiny_checkpoint, tmp_path / "a", f"prompts_file={prompts}", "sampler=ddpm", "batch_size=4"))
    sample(_sample_config(tiny_checkpoint, tmp_path / "b", f"prompts_file={prompts}", "sampler=ddpm", "batch_size=1"))
    for name in ("00000.png", "00001.png", "00002.png", "00003.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name))
        b = np.asarray(Image.open(tmp_path / "b" / name))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched matmuls may differ in the last bit
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / "00000.png")), np.asarray(Image.open(tmp_path / "a" / "00001.png")))


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        sample(_sample_config(tmp_path / "nope.ckpt", tmp_path, "prompt=x"))


def test_wrong_file_is_a_user_error(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        sample(_sample_config(bogus, tmp_path, "prompt=x"))


def test_prompt_and_prompts_file_are_exclusive(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        sample(_sample_config(tiny_checkpoint, tmp_path))
