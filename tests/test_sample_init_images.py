"""sample.py init_images=... (image-to-image) and masks=... (inpainting) on a tiny checkpoint trained by train.py."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ldm.data.toy import render, sample_spec
from ldm.errors import UserError
from ldm.pipeline import ImageInputs, pipeline_from_checkpoint, to_uint8
from ldm_testing import compose_config
from sample import sample

PROMPT = "prompt='a red circle in the top left'"
SAMPLERS = ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_ancestral", "heun", "plms"]


def _config(checkpoint, out_dir, *overrides):
    return compose_config(
        "sample",
        [
            f"checkpoint={checkpoint}",
            f"out_dir={out_dir}",
            "steps=4",
            "num_images_per_prompt=2",
            "batch_size=3",
            "sampler=ddpm",
            *overrides,
        ],
    )


@pytest.fixture
def inputs(tmp_path):
    """Two toy images (32x32, the tiny model's size) and a mask of their right halves."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("first.png", "second.png"):
        render(sample_spec(rng)).resize((32, 32)).save(folder / name)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return folder, tmp_path / "mask.png"


def _pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_strength_one_is_text_to_image_with_the_same_seed_bit_for_bit(tiny_checkpoint, tmp_path, inputs):
    folder, _ = inputs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\n" * 2)  # the job text-to-image makes for two inputs
    sample(_config(tiny_checkpoint, tmp_path / "t2i", f"prompts_file={prompts}"))
    rows = sample(_config(tiny_checkpoint, tmp_path / "i2i", PROMPT, f"init_images={folder}", "strength=1"))
    assert [(r["init_image"], r["seed"], r["strength"]) for r in rows] == [
        ("first.png", 0, 1.0),
        ("first.png", 1, 1.0),
        ("second.png", 2, 1.0),
        ("second.png", 3, 1.0),
    ]
    for index in range(4):  # a stochastic sampler: its later noise draws match too
        name = f"{index:06d}.png"
        assert (tmp_path / "t2i" / name).read_bytes() == (tmp_path / "i2i" / name).read_bytes()


def test_strength_zero_returns_the_input_through_the_vae(tiny_checkpoint, tmp_path, inputs):
    folder, _ = inputs
    sample(
        _config(
            tiny_checkpoint, tmp_path / "out", PROMPT, f"init_images={folder}", "strength=0", "num_images_per_prompt=1"
        )
    )
    pipeline, _ = pipeline_from_checkpoint(str(tiny_checkpoint))
    for index, name in enumerate(("first.png", "second.png")):
        image = torch.from_numpy(np.array(Image.open(folder / name))).permute(2, 0, 1)[None].float() / 255
        round_trip = to_uint8(pipeline.decode(pipeline.encode(image)))[0].numpy().astype(int)  # encode -> decode
        assert np.abs(_pixels(tmp_path / "out" / f"{index:06d}.png") - round_trip).max() <= 1


def test_every_sampler_samples_from_an_input_and_inpaints_keeping_the_known_latents(tiny_checkpoint, inputs):
    folder, mask_file = inputs
    pipeline, _ = pipeline_from_checkpoint(str(tiny_checkpoint))
    image = torch.from_numpy(np.array(Image.open(folder / "first.png"))).permute(2, 0, 1)[None].float() / 255
    mask = torch.from_numpy(np.array(Image.open(mask_file))).float()[None, None] / 255
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny U-Net: a second thread only synchronises (much slower on a busy CPU)
    try:
        known = pipeline.encode(image)  # (1, C, 8, 8), as the pipeline encodes it; the mask keeps latent columns 0-3
        for name in SAMPLERS:
            sampler = instantiate(compose_config("sample", ["checkpoint=x", f"sampler={name}"]).sampler)
            edited = pipeline.sample_latents(
                ["a blue square in the center"], [3], sampler, 3, init=ImageInputs(image, 0.5)
            )
            assert not torch.allclose(edited, known, atol=1e-3), name
            inpainted = pipeline.sample_latents(
                ["a blue square in the center"],
                [3],
                sampler,
                3,
                init=ImageInputs(image, 1.0, mask, resample_steps=2, jump_length=1),
            )
            assert torch.equal(inpainted[..., :4], known[..., :4]), (
                name
            )  # the known half: the input's latent, bit for bit
            assert not torch.allclose(inpainted[..., 4:], known[..., 4:], atol=1e-3), name
        again = pipeline.sample_latents(
            ["a blue square in the center"],
            [3],
            sampler,
            3,
            init=ImageInputs(image, 1.0, mask, resample_steps=2, jump_length=1),
        )
        assert torch.equal(again, inpainted)  # every draw from the image's seed
    finally:
        torch.set_num_threads(threads)


def test_inpainting_job_and_a_rerun_makes_only_what_is_missing(tiny_checkpoint, tmp_path, inputs):
    folder, mask_file = inputs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square in the center\na green triangle in the bottom left\n")  # one per input, in order
    job = [f"prompts_file={prompts}", f"init_images={folder}", f"masks={mask_file}", "inpaint.resample_steps=2"]
    rows = sample(_config(tiny_checkpoint, tmp_path / "full", *job))
    assert [(r["prompt"][:6], r["init_image"], r["mask"]) for r in rows] == [
        ("a blue", "first.png", "mask.png"),
        ("a blue", "first.png", "mask.png"),
        ("a gree", "second.png", "mask.png"),
        ("a gree", "second.png", "mask.png"),
    ]
    assert rows[0]["strength"] == 1.0 and rows[0]["inpaint"] == {"resample_steps": 2, "jump_length": 1}
    partial = tmp_path / "partial"
    sample(_config(tiny_checkpoint, partial, *job))
    for name in ("000001.png", "000002.png", "metadata.jsonl"):  # a crash lost these
        (partial / name).unlink()
    kept = (partial / "000000.png").stat().st_mtime_ns
    sample(_config(tiny_checkpoint, partial, *job))
    assert (partial / "000000.png").stat().st_mtime_ns == kept  # not redone
    for index in range(4):
        name = f"{index:06d}.png"
        assert np.abs(_pixels(partial / name) - _pixels(tmp_path / "full" / name)).max() <= 1  # reproduced per image
    assert (partial / "metadata.jsonl").read_text() == (tmp_path / "full" / "metadata.jsonl").read_text()


def test_an_image_to_image_rerun_makes_only_what_is_missing_and_other_inputs_refuse_the_folder(
    tiny_checkpoint, tmp_path, inputs
):
    folder, mask_file = inputs
    out = tmp_path / "out"
    job = [PROMPT, f"init_images={folder}", "strength=0.5"]
    sample(_config(tiny_checkpoint, out, *job))
    manifest = json.loads((out / "job.json").read_text())["settings"]
    assert manifest["strength"] == 0.5 and len(manifest["init_images"]) == 64 and manifest["masks"] is None
    first = (out / "000000.png").read_bytes()
    (out / "000003.png").unlink()
    rows = sample(_config(tiny_checkpoint, out, *job))
    assert len(rows) == 4 and (out / "000000.png").read_bytes() == first and (out / "000003.png").is_file()
    for change, named in (("strength=0.6", "strength 0.5 -> 0.6"), (f"masks={mask_file}", "masks")):
        with pytest.raises(UserError, match=rf"holds samples of another job \(.*{named}.*\)"):
            sample(_config(tiny_checkpoint, out, *job, change))
    render(sample_spec(np.random.default_rng(9))).resize((32, 32)).save(folder / "second.png")  # the input changed
    with pytest.raises(UserError, match=r"holds samples of another job \(init_images\)"):
        sample(_config(tiny_checkpoint, out, *job))


def test_shards_as_inputs_pair_with_their_own_captions(tiny_checkpoint, tmp_path):
    shard = tmp_path / "inputs-000000.tar"
    rng = np.random.default_rng(1)
    with tarfile.open(shard, "w") as tar:
        for key, text in (("k1", "a red circle in the top left"), ("k2", "a blue square in the center")):
            png = io.BytesIO()
            render(sample_spec(rng)).save(png, format="PNG")  # 64x64: resized to the model's 32x32
            for suffix, data in ((".png", png.getvalue()), (".txt", text.encode())):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows = sample(
        _config(
            tiny_checkpoint,
            tmp_path / "out",
            f"prompts_shards={shard}",
            f"init_images={shard}",
            "num_images_per_prompt=1",
            "strength=0.5",
        )
    )
    assert [(r["prompt"], r["init_image"], r["key"]) for r in rows] == [
        ("a red circle in the top left", "inputs-000000.tar/k1.png", "k1"),
        ("a blue square in the center", "inputs-000000.tar/k2.png", "k2"),
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strength=0.5"], r"strength=... needs init_images=DIR\|SHARDS"),
        (["masks=/tmp"], r"masks=... needs init_images"),
        (["init_images=INPUTS", "strength=1.5"], r"strength must be a number in \[0, 1\], got 1.5"),
        (
            ["init_images=INPUTS", "inpaint.resample_steps=0"],
            r"inpaint.resample_steps must be a positive integer, got 0",
        ),
        (["init_images=INPUTS", "masks=INPUTS/nope.png"], r"masks=.*nope.png: no such file or folder"),
        (
            ["init_images=INPUTS", "prompts_file=PROMPTS3"],
            r"3 prompts for 2 init images \(prompts_file/prompts_shards\)",
        ),
    ],
)
def test_bad_input_settings_are_one_line_errors(tiny_checkpoint, tmp_path, inputs, overrides, message):
    folder, _ = inputs
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    overrides = [o.replace("INPUTS", str(folder)).replace("PROMPTS3", str(tmp_path / "three.txt")) for o in overrides]
    prompt = [] if any(o.startswith("prompts_file") for o in overrides) else [PROMPT]
    with pytest.raises(UserError, match=message):
        sample(_config(tiny_checkpoint, tmp_path / "out", *prompt, *overrides))
    assert not (tmp_path / "out" / "job.json").exists()  # refused before the folder is claimed


def test_a_mask_of_another_size_is_refused_in_one_line(tiny_checkpoint, tmp_path, inputs):
    folder, _ = inputs
    Image.new("L", (20, 32), 255).save(tmp_path / "small.png")
    with pytest.raises(
        UserError, match=r"mask small.png is 20x32 but first.png is 32x32: a mask must have its image's size"
    ):
        sample(
            _config(
                tiny_checkpoint, tmp_path / "out", PROMPT, f"init_images={folder}", f"masks={tmp_path / 'small.png'}"
            )
        )
