"""sample.py on a tiny checkpoint trained by train.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_testing import compose_config, train_tiny_checkpoint
from ldm.errors import UserError
from ldm.pipeline import pipeline_from_checkpoint
from sample import sample


def _sample_config(checkpoint, out_dir, *overrides):
    return compose_config(
        "sample",
        [f"checkpoint={checkpoint}", f"out_dir={out_dir}", "steps=3", "num_images_per_prompt=2", "batch_size=3", *overrides],
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_sample_writes_images_metadata_and_grid(tiny_checkpoint, tmp_path, sampler):
    rows = sample(_sample_config(tiny_checkpoint, tmp_path, "prompt='a red circle in the top left'", f"sampler={sampler}"))
    assert [r["file"] for r in rows] == ["000000.png", "000001.png"]
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert lines == rows
    assert {"file", "prompt", "seed", "sampler", "steps", "guidance_scale"} <= set(lines[0])
    assert lines[0]["sampler"] == sampler and [r["seed"] for r in lines] == [0, 1]
    image = Image.open(tmp_path / "000000.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert (tmp_path / "grid.png").is_file()


def test_same_seed_same_images_whatever_the_batch(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\na blue square in the center\n")
    sample(_sample_config(tiny_checkpoint, tmp_path / "a", f"prompts_file={prompts}", "sampler=ddpm", "batch_size=4"))
    sample(_sample_config(tiny_checkpoint, tmp_path / "b", f"prompts_file={prompts}", "sampler=ddpm", "batch_size=1"))
    for name in ("000000.png", "000001.png", "000002.png", "000003.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name))
        b = np.asarray(Image.open(tmp_path / "b" / name))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched matmuls may differ in the last bit
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / "000000.png")),
                              np.asarray(Image.open(tmp_path / "a" / "000001.png")))


def test_a_self_conditioned_checkpoint_samples_the_same_images_whatever_the_batch(tmp_path, toy_data_dir):
    checkpoint = train_tiny_checkpoint(tmp_path / "run", toy_data_dir, steps=2, overrides=["model.unet.self_conditioning=true"])
    assert pipeline_from_checkpoint(str(checkpoint))[0].unet.self_conditioning  # rebuilt from the checkpoint alone
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\na blue square in the center\n")
    for out, batch in (("a", 4), ("b", 1)):  # each batch is its own sampling run, with its own estimates
        sample(_sample_config(checkpoint, tmp_path / out, f"prompts_file={prompts}", f"batch_size={batch}"))
    for name in ("000000.png", "000001.png", "000002.png", "000003.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name)).astype(int)
        assert np.abs(a - np.asarray(Image.open(tmp_path / "b" / name)).astype(int)).max() <= 1


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        sample(_sample_config(tmp_path / "nope.ckpt", tmp_path, "prompt=x"))


def test_wrong_file_is_a_user_error(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        sample(_sample_config(bogus, tmp_path, "prompt=x"))


def test_guidance_interval_is_used_and_recorded(tiny_checkpoint, tmp_path):
    prompt = "prompt='a red circle in the top left'"
    full = sample(_sample_config(tiny_checkpoint, tmp_path / "full", prompt))
    inside = sample(_sample_config(tiny_checkpoint, tmp_path / "inside", prompt, "guidance_interval=[0,999]"))
    outside = sample(_sample_config(tiny_checkpoint, tmp_path / "outside", prompt, "guidance_interval=[0,0]"))
    assert inside[0]["guidance_interval"] == [0, 999] and full[0]["guidance_interval"] is None

    def pixels(name):
        return np.asarray(Image.open(tmp_path / name / "000000.png"))

    assert np.array_equal(pixels("full"), pixels("inside"))  # every step of the grid lies in [0, 999]
    assert not np.array_equal(pixels("full"), pixels("outside"))  # no step of a 3-step grid is t = 0
    with pytest.raises(UserError, match="t_min <= t_max"):
        sample(_sample_config(tiny_checkpoint, tmp_path / "bad", prompt, "guidance_interval=[500,100]"))
    with pytest.raises(UserError, match=r"\[t_min, t_max\]"):
        sample(_sample_config(tiny_checkpoint, tmp_path / "bad", prompt, "guidance_interval=7"))


def test_prompt_and_prompts_file_are_exclusive(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="exactly one of prompt"):
        sample(_sample_config(tiny_checkpoint, tmp_path))


def test_jsonl_prompts_carry_their_fields(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle in the top left", "id": 7}\n{"caption": "a blue square in the center", "id": 9}\n')
    rows = sample(_sample_config(tiny_checkpoint, tmp_path / "out", f"prompts_file={prompts}", "num_images_per_prompt=1"))
    assert [(r["prompt"], r["id"]) for r in rows] == [("a red circle in the top left", 7), ("a blue square in the center", 9)]


def test_rerun_makes_only_what_is_missing(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\na blue square in the center\n")
    config = _sample_config(tiny_checkpoint, tmp_path / "full", f"prompts_file={prompts}", "sampler=ddpm")
    sample(config)
    partial = tmp_path / "partial"
    sample(_sample_config(tiny_checkpoint, partial, f"prompts_file={prompts}", "sampler=ddpm"))
    for name in ("000001.png", "000003.png", "metadata.jsonl"):  # a crash lost these
        (partial / name).unlink()
    before = (partial / "000000.png").stat().st_mtime_ns
    sample(_sample_config(tiny_checkpoint, partial, f"prompts_file={prompts}", "sampler=ddpm"))
    assert (partial / "000000.png").stat().st_mtime_ns == before  # not redone
    for name in ("000000.png", "000001.png", "000002.png", "000003.png"):
        a = np.asarray(Image.open(partial / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "full" / name)).astype(int)
        assert np.abs(a - b).max() <= 1  # the rerun batches 1 and 3 together: last-bit differences
    assert (partial / "metadata.jsonl").read_text() == (tmp_path / "full" / "metadata.jsonl").read_text()


def test_shard_output(tiny_checkpoint, tmp_path):
    import tarfile

    rows = sample(_sample_config(tiny_checkpoint, tmp_path, "prompt='a red circle in the top left'",
                                 "num_images_per_prompt=3", "output=shards", "samples_per_shard=2"))
    assert len(rows) == 3
    names = sorted(p.name for p in tmp_path.glob("samples-*.tar"))
    assert names == ["samples-000000.tar", "samples-000001.tar"]
    with tarfile.open(tmp_path / "samples-000000.tar") as tar:
        assert tar.getnames() == ["000000.png", "000000.json", "000001.png", "000001.json"]
