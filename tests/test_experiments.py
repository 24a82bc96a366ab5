"""Every preset under configs/experiment/ trains for real: a few steps through train.py, each shrunk
to tiny sizes where it names SD-sized networks or files (the shrinking keeps every structural option
of the preset: data module, task, strategy, callbacks, precision choices aside)."""

from pathlib import Path

import pytest
import torch
from formats.published import SD_SHAPE_OVERRIDES, TEXT_LAYERS, WIDTH, write_published_folder
from omegaconf import open_dict

from ldm.checkpoints import load_training_checkpoint, save_safetensors
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm_testing import CONFIGS, TINY_MODEL, TINY_TRAINING, compose_config
from train import train

STEPS = 2
SHORT = [
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "trainer.precision=32",
    "logger=csv",
    "optim.lr_scheduler.schedule.warmup_steps=1",
    "data.num_workers=0",
]
GRID = [
    "callbacks.sample_grid.prompts=[a red circle]",
    "callbacks.sample_grid.images_per_prompt=1",
    "callbacks.sample_grid.num_steps=2",
]
TOY_DATA = ["data.batch_size=4", "data.shuffle_buffer=8", "data.image_size=32"]


def _toy(tmp_path: Path, data: Path) -> list[str]:
    return [*TINY_MODEL, *(o for o in TINY_TRAINING if not o.startswith("trainer.max_steps")), *SHORT]


def _first_stage(tmp_path: Path, data: Path) -> list[str]:
    return [*TOY_DATA, *SHORT, "callbacks.export.scaling_batches=1"]


def _toy_vae(tmp_path: Path, data: Path) -> list[str]:
    return [*_first_stage(tmp_path, data), "model.autoencoder.module.channel_multipliers=[1,1]"]


def _classifier(tmp_path: Path, data: Path) -> list[str]:
    return [*TOY_DATA, *SHORT, "task.posterior_cache_size=0"]


def _sd15_finetune(tmp_path: Path, data: Path) -> list[str]:
    folder = write_published_folder(tmp_path / "sd15", "sd1")  # an fp16 diffusers folder, as published
    return [
        *SD_SHAPE_OVERRIDES,
        "model.unet.num_heads=2",
        f"model.pretrained={folder}",
        f"data.shards={data}/toy/train-*.tar",
        "data.image_size=32",
        "data.batch_size=2",
        "data.shuffle_buffer=8",
        *SHORT,
        *GRID,
    ]


def _sd21_scratch(tmp_path: Path, data: Path) -> list[str]:
    # trained from scratch, its frozen parts from weights files: a VAE file and an open_clip text tower
    vae = AutoencoderKL(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, resolution=32)
    save_safetensors(vae.state_dict(), tmp_path / "vae.safetensors")
    text_cfg = dict(context_length=77, vocab_size=49408, width=WIDTH, heads=2, layers=TEXT_LAYERS)
    text = OpenCLIPTextEncoder(model_name=None, text_cfg=text_cfg, layer="penultimate", init_seed=7)
    save_safetensors(text.model.state_dict(), tmp_path / "text.safetensors")
    return [
        *SD_SHAPE_OVERRIDES,
        "model.unet.num_heads=null",
        "model.unet.head_dim=16",
        f"model.autoencoder.path={tmp_path / 'vae.safetensors'}",
        f"model.conditioner.pretrained={tmp_path / 'text.safetensors'}",
        f"data.shards={data}/toy/train-*.tar",
        f"data.val_shards={data}/toy/val-*.tar",
        "data.image_size=32",
        "data.batch_size=2",
        "data.shuffle_buffer=8",
        *SHORT,
        *GRID,
    ]


def _photos(folder: Path, count: int = 4) -> Path:
    """A folder of captioned images as people bring them (x.png + x.txt)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40, 32), (60 * i, 200 - 40 * i, 90)).save(folder / f"photo_{i}.png")
        (folder / f"photo_{i}.txt").write_text(f"a photo of shape {i}")
    return folder


def _sd15_lora(tmp_path: Path, data: Path) -> list[str]:
    folder = write_published_folder(tmp_path / "sd15", "sd1")
    return [
        *SD_SHAPE_OVERRIDES,
        "model.unet.num_heads=2",
        f"model.pretrained={folder}",
        f"data.path={_photos(tmp_path / 'photos')}",
        "data.image_size=32",
        "data.batch_size=2",
        *SHORT,
        *GRID,
    ]


def _sd15_dreambooth(tmp_path: Path, data: Path) -> list[str]:
    # its class images drawn first by the published base through the sampling job (2 images, 2 steps)
    folder = write_published_folder(tmp_path / "sd15", "sd1")
    return [
        *SD_SHAPE_OVERRIDES,
        "model.unet.num_heads=2",
        f"model.pretrained={folder}",
        f"data.instance_path={_photos(tmp_path / 'photos')}",
        f"data.class_path={tmp_path / 'class'}",
        "data.num_class_images=2",
        "data.class_steps=2",
        "data.class_batch_size=2",
        "data.image_size=32",
        "data.repeats=1",
        *SHORT,
        *GRID,
    ]


SHRINK = {
    "tiny": lambda tmp_path, data: ["trainer.max_steps=2"],
    "toy": _toy,
    "toy_vae": _toy_vae,
    "toy_vae_decoder": _first_stage,
    "toy_classifier": _classifier,
    "sd15_finetune": _sd15_finetune,
    "sd15_lora": _sd15_lora,
    "sd15_dreambooth": _sd15_dreambooth,
    "sd21_base_256_scratch": _sd21_scratch,
}
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_every_experiment_has_a_shrunk_run_here():
    assert sorted(SHRINK) == EXPERIMENTS, "give the new preset a SHRINK entry: every preset must train in a test"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_a_few_real_steps(experiment, tmp_path, toy_data_dir):
    if experiment not in SHRINK:
        pytest.fail(f"experiment={experiment} has no SHRINK entry")
    cfg = compose_config("train", [f"experiment={experiment}", *SHRINK[experiment](tmp_path, toy_data_dir)])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(toy_data_dir)
        if cfg.data.get("prepare") is not None:
            cfg.data.prepare.num_train, cfg.data.prepare.num_val = 256, 32  # the session's toy data
    result = train(cfg)
    assert result["trainer"].global_step == STEPS
    last = load_training_checkpoint(Path(result["output_dir"]) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
