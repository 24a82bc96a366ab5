"""Fine-tuning a published model end to end, as a user does it (docs/finetuning.md), for SD 1.x and SD 2.x
shapes: an fp16 diffusers folder written by diffusers itself -> `train.py` on a folder of captioned JPEGs of
mixed aspect ratios with buckets, relaunched with `resume=auto` -> `sample.py` from the run's checkpoint ->
`ldm.convert` to a single file and to diffusers, read back by diffusers' own converters and `from_pretrained`.
"""

import json
from pathlib import Path

import pytest
import torch
from formats.published import SD_SHAPE_OVERRIDES, WIDTH, diffusers_tensors, write_published_folder
from omegaconf import open_dict
from PIL import Image
from safetensors.torch import load_file

from ldm.checkpoints import load_training_checkpoint
from ldm.convert import main as convert
from ldm.formats import load_bundle
from ldm_testing import compose_config
from sample import sample
from train import train

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

STEPS = 4
BUCKETS = [[64, 32], [32, 64], [48, 48]]  # (width, height), about 48^2 pixels each
# (width, height) of the photos: every bucket gets some, none is square-cropped away
PHOTO_SIZES = [(80, 40), (40, 80), (60, 60), (96, 50), (50, 96), (64, 64), (90, 44), (44, 90)]

# our model config of the tiny published shapes (tests/formats/published.py), per family
SHAPES = {
    "sd1": ["experiment=sd15_finetune", "model.unet.num_heads=2"],
    "sd2": ["experiment=sd15_finetune", "model=sd21_768", "model.unet.head_dim=16"],
}
COMMON = [
    *SD_SHAPE_OVERRIDES,
    "data=folder",
    "data.image_size=48",
    f"data.buckets={json.dumps(BUCKETS)}",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.repeats=2",
    "trainer.accelerator=cpu",
    "trainer.precision=32",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.sample_grid.prompts=[a photo of a red square]",
    "callbacks.sample_grid.images_per_prompt=1",
    "callbacks.sample_grid.num_steps=2",
    "optim.optimizer.lr=1e-3",
    "logger=csv",
    "resume=auto",
]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def published(request, tmp_path_factory):
    """(family, fp16 diffusers folder) of a tiny model, saved by diffusers as the hub's SD 1.5 / 2.1 are."""
    return request.param, write_published_folder(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of captioned JPEGs of mixed aspect ratios: x.jpg beside x.txt."""
    folder = tmp_path_factory.mktemp("photos")
    for index, (width, height) in enumerate(PHOTO_SIZES):
        colour = (40 * index % 256, 255 - 30 * index, 90)
        image = Image.new("RGB", (width, height), colour)
        image.paste((255, 255, 255), (width // 4, height // 4, width // 2, height // 2))
        image.save(folder / f"{index:03d}.jpg", quality=90)
        (folder / f"{index:03d}.txt").write_text(f"a photo of a white square on colour {index}")
    return folder


def _train(family: str, folder: Path, photos: Path, run_dir: Path, *extra: str) -> dict:
    cfg = compose_config(
        "train",
        [
            *SHAPES[family],
            *COMMON,
            f"model.pretrained={folder}",
            f"data.path={photos}",
            f"trainer.max_steps={STEPS}",
            *extra,
        ],
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return train(cfg)


def _unet_output(unet: torch.nn.Module, diffusers_layout: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, WIDTH, generator=generator)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context).sample if diffusers_layout else unet(x, t, context)


@pytest.mark.slow
def test_a_published_fp16_model_fine_tunes_resumes_samples_and_exports(published, photos, tmp_path):
    family, folder = published
    straight = _train(family, folder, photos, tmp_path / "straight")["task"]

    # the requeue-safe command: the first launch loads the pretrained file and is cut off halfway...
    run_dir = tmp_path / "run"
    _train(
        family,
        folder,
        photos,
        run_dir,
        "+callbacks.stop._target_=ldm_testing.StopAfterStep",
        f"+callbacks.stop.step={STEPS // 2}",
    )
    assert load_training_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STEPS // 2
    # ... and the same command again resumes, bit for bit, buckets and all
    resumed = _train(family, folder, photos, run_dir)["task"]
    for name, tensor in straight.unet.state_dict().items():
        assert torch.equal(tensor, resumed.unet.state_dict()[name]), name
    original = load_bundle(folder)
    trained = {k: v for k, v in resumed.unet.state_dict().items()}
    assert any(not torch.equal(trained[k], original.unet[k].float()) for k in original.unet)  # it did train

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    rows = sample(
        compose_config(
            "sample",
            [
                f"checkpoint={checkpoint}",
                f"out_dir={tmp_path / 'samples'}",
                "steps=2",
                "prompt='a photo of a white square'",
                "num_images_per_prompt=2",
                "width=64",
                "height=32",
            ],
        )
    )
    assert len(rows) == 2 and Image.open(tmp_path / "samples" / rows[0]["file"]).size == (64, 32)

    # the single file, read by diffusers' own converters: our trained U-Net, the published VAE and text encoder
    single = tmp_path / "model.safetensors"
    assert convert([str(checkpoint), str(single), "--to", "sd", "--no-ema"]) in (None, 0)
    state = load_file(str(single))
    unet_config = diffusers.UNet2DConditionModel.load_config(str(folder / "unet"))
    theirs = diffusers.UNet2DConditionModel.from_config(unet_config)
    theirs.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(state, unet_config))
    ours = load_bundle(checkpoint, use_ema=False).build()[0]
    assert (_unet_output(theirs, True) - _unet_output(ours, False)).abs().max() < 1e-5
    vae = single_file_utils.convert_ldm_vae_checkpoint(state, diffusers.AutoencoderKL.load_config(str(folder / "vae")))
    if family == "sd1":
        text = single_file_utils.convert_ldm_clip_checkpoint(state)
        text.pop("text_model.embeddings.position_ids")
    else:
        config = transformers.CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
        text = single_file_utils.convert_open_clip_checkpoint(transformers.CLIPTextModel(config), state)
    published_tensors = diffusers_tensors(folder)
    for converted, part in ((vae, "vae"), (text, "text_encoder")):  # frozen: the file's fp16 values, unchanged
        assert converted.keys() == published_tensors[part].keys(), part
        assert all(torch.equal(converted[k].half(), v) for k, v in published_tensors[part].items()), part

    # the diffusers folder, loaded by from_pretrained: the same U-Net, the published frozen parts
    exported = tmp_path / "pipe"
    convert([str(checkpoint), str(exported), "--to", "diffusers", "--no-ema"])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(exported), local_files_only=True, safety_checker=None)
    assert (_unet_output(pipe.unet, True) - _unet_output(ours, False)).abs().max() < 1e-5
    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.scheduler.config.prediction_type == reference.scheduler.config.prediction_type
    assert pipe.tokenizer.pad_token_id == reference.tokenizer.pad_token_id
    for part in ("vae", "text_encoder"):
        expected = getattr(reference, part).state_dict()
        assert all(torch.equal(v.half(), expected[k].half()) for k, v in getattr(pipe, part).state_dict().items())


def test_fine_tuning_a_folder_with_another_prediction_type_warns(published, photos, tmp_path, capsys):
    family, folder = published
    other = "v" if family == "sd1" else "eps"  # sd1's folder states eps, sd2's v
    _train(
        family,
        folder,
        photos,
        tmp_path / "run",
        "objective=default",
        f"model.prediction_type={other}",
        "trainer.max_steps=1",
        "~callbacks.sample_grid",
    )
    stated = "eps" if family == "sd1" else "v"
    assert f"warning: {folder} predicts {stated}, and this run trains it to predict {other}" in capsys.readouterr().err
