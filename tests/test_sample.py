"""sample.py on a tiny checkpoint trained by train.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.errors import UserError
from ldm.pipeline import pipeline_from_checkpoint
from ldm_testing import compose_config, train_tiny_checkpoint
from sample import sample


def _sample_config(checkpoint, out_dir, *overrides):
    return compose_config(
        "sample",
        [
            f"checkpoint={checkpoint}",
            f"out_dir={out_dir}",
            "steps=3",
            "num_images_per_prompt=2",
            "batch_size=3",
            *overrides,
        ],
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_sample_writes_images_metadata_and_grid(tiny_checkpoint, tmp_path, sampler):
    rows = sample(
        _sample_config(tiny_checkpoint, tmp_path, "prompt='a red circle in the top left'", f"sampler={sampler}")
    )
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
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "a" / "000000.png")), np.asarray(Image.open(tmp_path / "a" / "000001.png"))
    )


def test_a_self_conditioned_checkpoint_samples_the_same_images_whatever_the_batch(tmp_path, toy_data_dir):
    checkpoint = train_tiny_checkpoint(
        tmp_path / "run", toy_data_dir, steps=2, overrides=["model.unet.self_conditioning=true"]
    )
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
    assert outside[0]["guidance_interval"] == [0, 0]

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
    prompts.write_text(
        '{"prompt": "a red circle in the top left", "id": 7}\n{"caption": "a blue square in the center", "id": 9}\n'
    )
    rows = sample(
        _sample_config(tiny_checkpoint, tmp_path / "out", f"prompts_file={prompts}", "num_images_per_prompt=1")
    )
    assert [(r["prompt"], r["id"]) for r in rows] == [
        ("a red circle in the top left", 7),
        ("a blue square in the center", 9),
    ]


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

    rows = sample(
        _sample_config(
            tiny_checkpoint,
            tmp_path,
            "prompt='a red circle in the top left'",
            "num_images_per_prompt=3",
            "output=shards",
            "samples_per_shard=2",
        )
    )
    assert len(rows) == 3
    names = sorted(p.name for p in tmp_path.glob("samples-*.tar"))
    assert names == ["samples-000000.tar", "samples-000001.tar"]
    with tarfile.open(tmp_path / "samples-000000.tar") as tar:
        assert tar.getnames() == ["000000.json", "000000.png", "000001.json", "000001.png"]  # ldm.data.shard_writer


# ---------------------------------------------------------------- issue 22: a rerun never mixes jobs
PROMPT = "prompt='a red circle in the top left'"


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    "change",
    [
        "prompt='a blue square in the center'",
        "seed=5",
        "steps=2",
        "sampler=ddim",
        "guidance_scale=1.5",
        "num_images_per_prompt=1",
    ],
)
def test_a_rerun_with_other_inputs_refuses_the_folder_and_leaves_it_untouched(tiny_checkpoint, tmp_path, change):
    out = tmp_path / "out"
    sample(_sample_config(tiny_checkpoint, out, PROMPT, "sampler=ddpm"))
    before = _files(out)
    key = change.split("=")[0]
    with pytest.raises(
        UserError, match=rf"holds samples of another job \(.*{key}.*\): use another out_dir, or overwrite=true"
    ):
        sample(_sample_config(tiny_checkpoint, out, PROMPT, "sampler=ddpm", change))
    assert _files(out) == before  # nothing made, nothing rewritten (metadata.jsonl included)


def test_overwrite_replaces_only_the_files_of_the_old_job(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    sample(_sample_config(tiny_checkpoint, out, PROMPT, "num_images_per_prompt=3"))
    (out / "notes.txt").write_text("mine")
    (out / "000001.png.bak").write_text("mine too")
    rows = sample(_sample_config(tiny_checkpoint, out, PROMPT, "seed=7", "overwrite=true"))
    assert [r["seed"] for r in rows] == [7, 8]
    assert not (out / "000002.png").exists()  # the old job's third image is gone, not mixed in
    assert (out / "notes.txt").read_text() == "mine" and (out / "000001.png.bak").is_file()
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in lines] == [7, 8]
    assert json.loads((out / "job.json").read_text())["settings"]["seed"] == 7


def test_a_changed_checkpoint_is_refused_and_a_copied_one_resumes(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    sample(_sample_config(tiny_checkpoint, out, PROMPT))
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(Path(tiny_checkpoint).read_bytes())
    (out / "000001.png").unlink()
    sample(_sample_config(copy, out, PROMPT))  # the same weights elsewhere: the same job, resumed
    assert (out / "000001.png").is_file()
    changed = bytearray(copy.read_bytes())
    changed[-30] ^= 0xFF  # one byte of the zip's central directory (its CRC-32s of every tensor)
    copy.write_bytes(bytes(changed))
    with pytest.raises(UserError, match=r"another job \(checkpoint\)"):
        sample(_sample_config(copy, out, PROMPT))


def test_a_folder_of_samples_without_a_manifest_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    sample(_sample_config(tiny_checkpoint, out, PROMPT))
    (out / "job.json").unlink()  # e.g. written by an older version
    with pytest.raises(UserError, match="holds samples of a job without job.json"):
        sample(_sample_config(tiny_checkpoint, out, PROMPT))


def test_carried_jsonl_fields_cannot_replace_generated_ones(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a red circle in the top left", "seed": 99, "index": 42, "file": "x.png", "id": 3}\n'
    )
    out = tmp_path / "out"
    rows = sample(_sample_config(tiny_checkpoint, out, f"prompts_file={prompts}"))
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert lines == rows
    assert [(r["file"], r["index"], r["seed"]) for r in lines] == [("000000.png", 0, 0), ("000001.png", 1, 1)]
    assert lines[0]["carried"] == {"seed": 99, "index": 42, "file": "x.png"} and lines[0]["id"] == 3


def test_a_non_finite_image_fails_its_item_and_a_rerun_remakes_it(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from ldm.pipeline import TextToImage

    call = TextToImage.__call__

    def seed_one_overflows(self, prompts, seeds, *args, **kwargs):
        images = call(self, prompts, seeds, *args, **kwargs)
        images[[s == 1 for s in seeds]] = float("nan")
        return images

    out = tmp_path / "out"
    monkeypatch.setattr(TextToImage, "__call__", seed_one_overflows)
    with pytest.raises(UserError, match=r"1 image\(s\) came out non-finite"):
        sample(_sample_config(tiny_checkpoint, out, PROMPT))
    assert "item 1 (seed 1" in capsys.readouterr().err
    assert (out / "000000.png").is_file() and not (out / "000001.png").exists()  # not saved black
    assert [json.loads(line)["index"] for line in (out / "metadata.jsonl").read_text().splitlines()] == [0]
    monkeypatch.setattr(TextToImage, "__call__", call)
    assert len(sample(_sample_config(tiny_checkpoint, out, PROMPT))) == 2
    assert (out / "000001.png").is_file()


# ---------------------------------------------------------------- one-line errors, image sizes
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "image_size=36",
            r"image_size=36 must be a multiple of 8 \(the VAE's and the U-Net's downsampling\): use 32 or 40",
        ),
        ("width=36", r"width=36 must be a multiple of 8"),
        ("height=0", r"height must be a positive integer, got 0"),
        ("steps=0", r"steps must be a positive integer, got 0"),
        ("steps=-3", r"steps must be a positive integer, got -3"),
        ("steps=5000", r"steps=5000 is more than the model's 1000 timesteps"),
        ("batch_size=0", r"batch_size must be a positive integer"),
        ("spacing=diagonal", r"spacing must be one of trailing"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_checkpoint, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        sample(_sample_config(tiny_checkpoint, tmp_path / "out", PROMPT, override))


@pytest.mark.slow
def test_sample_py_prints_one_line_for_a_bad_image_size(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    from ldm_testing import ROOT

    result = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"checkpoint={tiny_checkpoint}",
            f"out_dir={tmp_path}",
            "prompt=x",
            "image_size=36",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: image_size=36 must be a multiple of 8 (the VAE's and the U-Net's downsampling): use 32 or 40"
    ]


def test_width_and_height_sample_non_square_images(tiny_checkpoint, tmp_path):
    rows = sample(_sample_config(tiny_checkpoint, tmp_path, PROMPT, "width=48", "height=24"))
    assert Image.open(tmp_path / "000000.png").size == (48, 24)
    assert (rows[0]["width"], rows[0]["height"]) == (48, 24)
    square = sample(_sample_config(tiny_checkpoint, tmp_path / "square", PROMPT))
    assert (square[0]["width"], square[0]["height"]) == (32, 32)


def test_pipeline_latents_follow_the_requested_size(tiny_checkpoint):
    from ldm.diffusion.samplers import sample_ddim

    pipeline, _ = pipeline_from_checkpoint(str(tiny_checkpoint))
    latents = pipeline.sample_latents(["x"], [0], sample_ddim, num_steps=1, size=(24, 48))
    factor = pipeline.autoencoder.downsampling_factor
    assert latents.shape == (1, pipeline.latent_shape[0], 24 // factor, 48 // factor)
    assert pipeline(["x"], [0], sample_ddim, num_steps=1, size=(24, 48)).shape == (1, 3, 24, 48)
    with pytest.raises(UserError, match=r"height=28 must be a multiple of 8 .*: use 24 or 32"):
        pipeline.latent_shape_for(28, 48)
