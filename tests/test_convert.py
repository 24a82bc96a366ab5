"""python -m ldm.convert and fine-tuning/sampling from converted files, on a tiny trained model."""

import pytest
import torch
from hydra.utils import instantiate

from ldm.checkpoints import load_training_checkpoint, submodule_state
from ldm.convert import main as convert
from ldm.formats import load_bundle, load_weights_into
from ldm_testing import TINY_MODEL, TINY_TRAINING, compose_config, train_tiny_checkpoint
from sample import sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_data_dir):
    """The tiny toy as configured: its U-Net works on 2x2 latent patches, which diffusers cannot hold."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("run"), toy_data_dir, steps=3)


@pytest.fixture(scope="module")
def trained_unpatched(tmp_path_factory, toy_data_dir):
    """The tiny toy with an SD-shaped U-Net (patch_size 1): exportable to diffusers too."""
    return train_tiny_checkpoint(
        tmp_path_factory.mktemp("run"), toy_data_dir, steps=3, overrides=["model.unet.patch_size=1"]
    )


@pytest.mark.parametrize("target, name", [("sd", "model.safetensors"), ("diffusers", "pipe")])
def test_training_checkpoint_converts_with_ema_weights(trained, trained_unpatched, tmp_path, target, name):
    checkpoint = trained if target == "sd" else trained_unpatched
    convert([str(checkpoint), str(tmp_path / name), "--to", target])
    bundle = load_bundle(tmp_path / name)
    state = load_training_checkpoint(checkpoint)["state_dict"]
    ema = submodule_state(state, "ema.module.")
    assert bundle.unet.keys() == ema.keys()
    assert all(torch.equal(bundle.unet[k], ema[k]) for k in ema)
    assert not all(torch.equal(ema[k], state[f"unet.{k}"]) for k in ema)  # EMA, not the raw weights


def test_no_ema_exports_the_trained_weights(trained, tmp_path):
    convert([str(trained), str(tmp_path / "raw.safetensors"), "--to", "sd", "--no-ema"])
    unet = submodule_state(load_training_checkpoint(trained)["state_dict"], "unet.")
    bundle = load_bundle(tmp_path / "raw.safetensors")
    assert all(torch.equal(bundle.unet[k], unet[k]) for k in unet)


def test_diffusers_export_of_the_toy_loads_in_diffusers(trained_unpatched, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    convert([str(trained_unpatched), str(tmp_path / "pipe"), "--to", "diffusers", "--dtype", "fp16"])
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), safety_checker=None)
    assert pipe.vae.config.norm_num_groups == 8  # the toy's narrow VAE survives the trip


def test_patched_toy_refuses_diffusers_in_one_line(trained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert([str(trained), str(tmp_path / "pipe"), "--to", "diffusers"])
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: this U-Net works on 2x2 latent patches") and "--to sd" in error
    assert "\n" not in error and not (tmp_path / "pipe").exists()


def test_fine_tuning_starts_from_a_converted_file(trained, tmp_path):
    convert([str(trained), str(tmp_path / "m.safetensors"), "--to", "sd"])
    cfg = compose_config("train", [*TINY_MODEL, *TINY_TRAINING])
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(run_config={})
    load_weights_into(task.unet, task.autoencoder, task.conditioner, tmp_path / "m.safetensors")
    ema = submodule_state(load_training_checkpoint(trained)["state_dict"], "ema.module.")
    assert all(torch.equal(task.unet.state_dict()[k], ema[k]) for k in ema)


def test_sample_from_a_single_file(trained, tmp_path):
    convert([str(trained), str(tmp_path / "m.safetensors"), "--to", "sd"])
    cfg = compose_config(
        "sample",
        [
            f"checkpoint={tmp_path / 'm.safetensors'}",
            f"out_dir={tmp_path / 'out'}",
            "prompt='a red circle in the top left'",
            "steps=2",
            "num_images_per_prompt=1",
        ],
    )
    rows = sample(cfg)
    assert len(rows) == 1 and (tmp_path / "out" / "000000.png").is_file()


def test_convert_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert([str(tmp_path / "missing.ckpt"), str(tmp_path / "x.safetensors"), "--to", "sd"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: model not found: {tmp_path / 'missing.ckpt'}"
