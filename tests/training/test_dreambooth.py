"""data=dreambooth: class images drawn by the base model with our sampling job (resumable, reused), every
batch instance photos then as many class images with a prior mask, full fine-tune and LoRA alike."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from ldm.data.toy import render, sample_spec
from ldm.errors import UserError
from ldm_testing import TINY_MODEL, TINY_TRAINING, compose_config
from train import train

INSTANCE_PROMPT = "a photo of sks circle"
CLASS_PROMPT = "a red circle in the center"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four 'photos' of the subject (toy images)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(4):
        render(sample_spec(rng)).save(folder / f"photo{i}.png")
    return folder


def dreambooth_config(out: Path, data: Path, base: Path, photos: Path, class_path: Path, *extra: str):
    training = [o for o in TINY_TRAINING if not o.startswith("data.")]  # (the toy shards' data keys)
    cfg = compose_config(
        "train",
        [
            *TINY_MODEL,
            *training,
            "~callbacks.sample_grid",
            "data=dreambooth",
            f"model.pretrained={base}",
            f"data.instance_path={photos}",
            f"data.instance_prompt='{INSTANCE_PROMPT}'",
            f"data.class_prompt='{CLASS_PROMPT}'",
            f"data.class_path={class_path}",
            "data.num_class_images=4",
            "data.class_steps=2",
            "data.class_guidance_scale=2",
            "data.image_size=32",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.repeats=2",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            *extra,
        ],
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.data_dir = str(data)
    return cfg


def test_class_images_are_made_once_and_batches_pair_them_with_the_photos(
    tiny_checkpoint, toy_data_dir, photos, tmp_path, capsys
):
    from hydra.utils import instantiate

    class_path = tmp_path / "class_images"
    cfg = dreambooth_config(tmp_path / "run", toy_data_dir, tiny_checkpoint, photos, class_path)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    assert sorted(p.name for p in class_path.glob("*.png")) == [f"00000{i}.png" for i in range(4)]
    assert (class_path / "job.json").is_file() and "made 4 class images" in capsys.readouterr().out
    before = {p.name: p.stat().st_mtime_ns for p in class_path.glob("*.png")}
    datamodule.prepare_data()  # a second run (or a restart) reuses them
    assert "reusing the 4 class images" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in class_path.glob("*.png")}
    (class_path / "000002.png").unlink()  # a generation killed midway: only the missing image is made
    datamodule.prepare_data()
    assert "made 1 class images" in capsys.readouterr().out

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["prior"].tolist() == [False, False, True, True]
    assert batch["caption"] == [INSTANCE_PROMPT] * 2 + [CLASS_PROMPT] * 2


def test_another_class_prompt_in_the_same_folder_is_refused(tiny_checkpoint, toy_data_dir, photos, tmp_path):
    from hydra.utils import instantiate

    class_path = tmp_path / "class_images"
    instantiate(
        dreambooth_config(tmp_path / "a", toy_data_dir, tiny_checkpoint, photos, class_path).data, _convert_="all"
    ).prepare_data()
    other = dreambooth_config(
        tmp_path / "b",
        toy_data_dir,
        tiny_checkpoint,
        photos,
        class_path,
        "data.class_prompt='a blue square in the center'",
    )
    with pytest.raises(UserError, match="another job"):
        instantiate(other.data, _convert_="all").prepare_data()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_dreambooth_trains_as_full_fine_tune_and_as_lora(tiny_checkpoint, toy_data_dir, photos, tmp_path, mode):
    extra = ["task.lora.rank=2"] if mode == "lora" else []
    cfg = dreambooth_config(tmp_path / "run", toy_data_dir, tiny_checkpoint, photos, tmp_path / "class", *extra)
    result = train(cfg)
    assert result["trainer"].global_step == 2 and np.isfinite(result["metrics"]["train/loss"])
    assert (result["task"].lora is not None) == (mode == "lora")


def test_buckets_are_refused(tiny_checkpoint, toy_data_dir, photos, tmp_path):
    from hydra.utils import instantiate

    cfg = dreambooth_config(
        tmp_path / "run", toy_data_dir, tiny_checkpoint, photos, tmp_path / "class", "data.buckets=auto"
    )
    with pytest.raises(Exception, match="buckets=null"):
        instantiate(cfg.data, _convert_="all")


def test_the_paired_stream_resumes_where_it_stopped(tiny_checkpoint, toy_data_dir, photos, tmp_path):
    # batch k of a resumed stream is batch k of the uninterrupted one, class images included
    from hydra.utils import instantiate

    from ldm.data.streams import StreamStart

    cfg = dreambooth_config(tmp_path / "run", toy_data_dir, tiny_checkpoint, photos, tmp_path / "class")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    stream = datamodule._stream(True)
    straight = []
    for epoch in range(2):
        stream.start = StreamStart(epoch, 0)
        straight += list(stream)
    stream.start = StreamStart(1, 1)  # as TrainingLoader sets it: epoch 1, one batch of it trained
    resumed = list(stream)
    assert len(resumed) == len(straight) // 2 - 1
    for a, b in zip(straight[len(straight) // 2 + 1 :], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
