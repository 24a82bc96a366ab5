"""sample.py classifier=... classifier_scale=... labels=...: classifier guidance on a tiny checkpoint trained by train.py."""

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ldm.errors import UserError
from ldm.models.classifier import NoisyClassifier
from ldm.pipeline import pipeline_from_checkpoint
from ldm.training.classifier import TOY_CLASSES, NoisyClassifierTraining, load_classifier
from ldm_testing import TINY_MODEL, compose_config, run_script
from sample import sample

PROMPT = "prompt='a red circle in the top left'"


def _config(checkpoint, out_dir, *overrides):
    return compose_config(
        "sample",
        [
            f"checkpoint={checkpoint}",
            f"out_dir={out_dir}",
            "steps=3",
            "num_images_per_prompt=2",
            "batch_size=3",
            "sampler=ddim",
            *overrides,
        ],
    )


def write_classifier_checkpoint(path, autoencoder, schedule, seed=0):
    """A tiny toy classifier's checkpoint as the classifier task writes it (its own spec writer), untrained:
    guidance only needs a differentiable log p(y | z_t)."""
    torch.manual_seed(seed)
    heads = {name: len(names) for name, names in TOY_CLASSES.items()}
    classifier = NoisyClassifier(heads, model_channels=8, channel_multipliers=[1, 2], norm_groups=4, pool_size=2)
    task = NoisyClassifierTraining(
        classifier, autoencoder, schedule, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), image_size=32
    )
    checkpoint = {"state_dict": {f"classifier.{k}": v for k, v in classifier.state_dict().items()}}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def _tiny_schedule(*overrides):
    """The noise schedule train.py builds for the tiny model (from its typed spec, as checkpoints store it)."""
    return instantiate(compose_config("train", [*TINY_MODEL, *overrides]).schedule)


@pytest.fixture(scope="module")
def tiny_classifier(tiny_checkpoint, tmp_path_factory):
    pipeline, _ = pipeline_from_checkpoint(str(tiny_checkpoint))
    path = tmp_path_factory.mktemp("classifier") / "classifier.ckpt"
    return write_classifier_checkpoint(path, pipeline.autoencoder, _tiny_schedule())


def _pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_guidance_steers_the_images_and_scale_zero_is_the_model_alone(tiny_checkpoint, tiny_classifier, tmp_path):
    plain = sample(_config(tiny_checkpoint, tmp_path / "plain", PROMPT))
    zero = sample(
        _config(tiny_checkpoint, tmp_path / "zero", PROMPT, f"classifier={tiny_classifier}", "classifier_scale=0")
    )
    guided = sample(
        _config(tiny_checkpoint, tmp_path / "guided", PROMPT, f"classifier={tiny_classifier}", "classifier_scale=50")
    )
    assert (tmp_path / "plain" / "000000.png").read_bytes() == (tmp_path / "zero" / "000000.png").read_bytes()
    assert np.abs(_pixels(tmp_path / "guided" / "000000.png") - _pixels(tmp_path / "plain" / "000000.png")).max() > 2
    assert "classifier" not in plain[0]
    assert guided[0]["labels"] == {"colour": "red", "shape": "circle", "position": "top left"}  # from the prompt
    assert (guided[0]["classifier"], guided[0]["classifier_scale"]) == (str(tiny_classifier), 50)
    assert zero[0]["labels"] == guided[0]["labels"]


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_guidance_from_labels_with_and_without_classifier_free_guidance(
    tiny_checkpoint, tiny_classifier, tmp_path, guidance_scale
):
    common = [f"classifier={tiny_classifier}", "classifier_scale=50", f"guidance_scale={guidance_scale}", "prompt=''"]
    red = sample(_config(tiny_checkpoint, tmp_path / "red", *common, "labels={colour: red, position: top left}"))
    blue = sample(_config(tiny_checkpoint, tmp_path / "blue", *common, "labels={colour: blue}"))
    assert red[0]["labels"] == {"colour": "red", "position": "top left"} and blue[0]["labels"] == {"colour": "blue"}
    assert red[0]["prompt"] == ""  # the unconditional model, steered by the classifier alone
    assert not np.array_equal(_pixels(tmp_path / "red" / "000000.png"), _pixels(tmp_path / "blue" / "000000.png"))


def test_labels_per_prompt_from_a_list_or_jsonl_records(tiny_checkpoint, tiny_classifier, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "", "labels": {"shape": "square"}}\n{"prompt": "a green triangle in the center"}\n')
    rows = sample(
        _config(
            tiny_checkpoint,
            tmp_path / "a",
            f"prompts_file={prompts}",
            f"classifier={tiny_classifier}",
            "num_images_per_prompt=1",
        )
    )
    assert [r["labels"] for r in rows] == [
        {"shape": "square"},
        {"colour": "green", "shape": "triangle", "position": "center"},
    ]
    rows = sample(
        _config(
            tiny_checkpoint,
            tmp_path / "b",
            f"prompts_file={prompts}",
            f"classifier={tiny_classifier}",
            "num_images_per_prompt=1",
            "labels=[{colour: white},{colour: red}]",
        )
    )
    assert [r["labels"] for r in rows] == [{"colour": "white"}, {"colour": "red"}]


def test_other_classifier_settings_refuse_the_folder_and_a_copied_classifier_resumes(
    tiny_checkpoint, tiny_classifier, tmp_path
):
    out = tmp_path / "out"
    job = [PROMPT, f"classifier={tiny_classifier}", "classifier_scale=2"]
    sample(_config(tiny_checkpoint, out, *job))
    settings = json.loads((out / "job.json").read_text())["settings"]
    assert settings["classifier_scale"] == 2 and len(settings["classifier"]) == 64 and settings["labels"] is None
    for change, named in (("classifier_scale=3", "classifier_scale 2 -> 3"), ("labels={colour: blue}", "labels")):
        with pytest.raises(UserError, match=rf"holds samples of another job \(.*{named}.*\)"):
            sample(_config(tiny_checkpoint, out, *job, change))
    with pytest.raises(UserError, match=r"holds samples of another job \(classifier_scale, classifier, labels\)"):
        sample(_config(tiny_checkpoint, out, PROMPT))  # the same job without guidance
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(tiny_classifier.read_bytes())
    (out / "000001.png").unlink()
    sample(_config(tiny_checkpoint, out, PROMPT, f"classifier={copy}", "classifier_scale=2"))  # same content: resumed
    other = write_classifier_checkpoint(tmp_path / "other.ckpt", load_vae(tiny_checkpoint), _tiny_schedule(), seed=1)
    with pytest.raises(UserError, match=r"another job \(classifier\)"):
        sample(_config(tiny_checkpoint, out, PROMPT, f"classifier={other}", "classifier_scale=2"))


def load_vae(checkpoint):
    return pipeline_from_checkpoint(str(checkpoint))[0].autoencoder


def test_a_classifier_of_other_latents_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    vae = load_vae(tiny_checkpoint)
    other_vae = type(vae)(**{**_vae_arguments(), "scaling_factor": vae.scaling_factor})  # fresh weights
    wrong_vae = write_classifier_checkpoint(tmp_path / "vae.ckpt", other_vae, _tiny_schedule())
    with pytest.raises(
        UserError,
        match=r"classifier=.*vae.ckpt was trained on another VAE's latents than the model's \(VAE fingerprint",
    ):
        sample(_config(tiny_checkpoint, tmp_path / "a", PROMPT, f"classifier={wrong_vae}"))
    wrong_schedule = write_classifier_checkpoint(
        tmp_path / "schedule.ckpt", vae, _tiny_schedule("schedule.zero_terminal_snr=false")
    )
    with pytest.raises(UserError, match=r"schedule.ckpt was trained with another noise schedule than the model's"):
        sample(_config(tiny_checkpoint, tmp_path / "b", PROMPT, f"classifier={wrong_schedule}"))
    vae.scaling_factor *= 2
    wrong_scale = write_classifier_checkpoint(tmp_path / "scale.ckpt", vae, _tiny_schedule())
    with pytest.raises(UserError, match=r"scale.ckpt was trained on latents scaled by"):
        sample(_config(tiny_checkpoint, tmp_path / "c", PROMPT, f"classifier={wrong_scale}"))
    _, spec = load_classifier(wrong_scale)
    assert spec["latent_scale"] == vae.scaling_factor


def _vae_arguments():
    cfg = compose_config("train", TINY_MODEL)
    arguments = OmegaConf.to_container(cfg.model.autoencoder.module, resolve=True)
    arguments.pop("_target_")
    return arguments


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["labels={colour: red}"],
            r"labels=\.\.\. chooses the classes of classifier guidance: give classifier=CKPT too",
        ),
        (["classifier=CLS", "classifier_scale=-1"], r"classifier_scale must be a number >= 0, got -1"),
        (["classifier=CLS", "labels={colour: pink}"], r"labels: colour 'pink' is not one of the classifier's"),
        (["classifier=CLS", "prompt=''"], r"prompt 0 \(''\) names none of the classifier's classes: give labels="),
    ],
)
def test_bad_classifier_settings_are_one_line_errors(tiny_checkpoint, tiny_classifier, tmp_path, overrides, message):
    overrides = [o.replace("CLS", str(tiny_classifier)) for o in overrides]
    prompt = [] if any(o.startswith("prompt=") for o in overrides) else [PROMPT]
    with pytest.raises(UserError, match=message):
        sample(_config(tiny_checkpoint, tmp_path / "out", *prompt, *overrides))
    assert not (tmp_path / "out" / "job.json").exists()


def test_sample_py_reads_labels_from_the_command_line(tiny_checkpoint, tiny_classifier, tmp_path, capsys):
    status = run_script(
        "sample.py",
        f"checkpoint={tiny_checkpoint}",
        f"out_dir={tmp_path}",
        "prompt=",
        "steps=2",
        "num_images_per_prompt=1",
        f"classifier={tiny_classifier}",
        "labels={colour: red, position: top left}",
    )
    assert status == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "metadata.jsonl").read_text())
    assert row["prompt"] == "" and row["labels"] == {"colour": "red", "position": "top left"}
