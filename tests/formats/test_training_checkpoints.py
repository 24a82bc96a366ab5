"""Training checkpoints build our own classes from a checked spec: they never name code to run."""

from __future__ import annotations

import shutil

import pytest
import torch

from ldm.checkpoints import save_safetensors
from ldm.errors import UserError
from ldm.formats import load_bundle
from ldm.formats.spec import checked_network_config


def _rewritten(source, target, edit):
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, target)
    return target


def test_the_checkpoint_stores_a_typed_spec(tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    spec = checkpoint["ldm"]["spec"]
    assert set(spec) == {
        "unet_config",
        "vae_config",
        "text_config",
        "family",
        "prediction_type",
        "image_size",
        "schedule",
    }
    assert "_target_" not in str(spec)
    assert spec["unet_config"]["model_channels"] == 32
    assert spec["schedule"]["kind"] == "scaled_linear"


@pytest.mark.parametrize("where", ["legacy_config", "spec"])
def test_a_checkpoint_naming_code_never_runs_it(tiny_checkpoint, tmp_path, where):
    marker = tmp_path / "marker"
    payload = {"_target_": "ldm.data.shard_reader.open_shard", "url": f"pipe:touch {marker}"}

    def plant(checkpoint):
        # frozen parts left out, so the loader must build them from what the file says
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("autoencoder.")
        }
        if where == "legacy_config":
            del checkpoint["ldm"]["spec"]
            checkpoint["ldm"]["config"]["model"]["autoencoder"] = payload
        else:
            checkpoint["ldm"]["spec"]["vae_config"] = payload

    hostile = _rewritten(tiny_checkpoint, tmp_path / "hostile.ckpt", plant)
    with pytest.raises(UserError):
        load_bundle(hostile)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text_config, message",
    [
        ({"model_name": "hf-hub:someone/model"}, "not an open_clip config shipped locally"),
        ({"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "may not be set by a model file"),
        ({"model_name": None, "text_cfg": {"hf_model_name": "bert-base-uncased", "width": 8}}, "Hugging Face parts"),
        ({"model_name": None, "text_cfg": {"width": float("nan")}}, "not a finite number"),
    ],
)
def test_text_towers_that_would_reach_a_hub_are_refused(text_config, message):
    with pytest.raises(UserError, match=message):
        checked_network_config("text_config", text_config)


def test_a_stored_hub_tag_in_a_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    def plant(checkpoint):
        checkpoint["ldm"]["spec"]["text_config"]["pretrained"] = "laion2b_s34b_b79k"

    with pytest.raises(UserError, match="pretrained may not be set"):
        load_bundle(_rewritten(tiny_checkpoint, tmp_path / "tag.ckpt", plant))


def _large_frozen_run(run_dir, toy_data_dir, tmp_path):
    """A run whose VAE comes from a weights file and is left out of its checkpoints (as SD's is)."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm_testing import train_tiny_checkpoint

    vae = AutoencoderKL(base_channels=16, channel_multipliers=(1, 1), num_res_blocks=1, norm_groups=8, resolution=64)
    weights = tmp_path / "weights" / "vae.safetensors"
    save_safetensors(vae.state_dict(), weights)
    checkpoint = train_tiny_checkpoint(
        run_dir,
        toy_data_dir,
        2,
        [f"model.autoencoder.path={weights}", "task.frozen_in_checkpoint_mb=0"],
    )
    return checkpoint, weights, vae


def test_a_checkpoint_with_frozen_parts_by_reference_stands_alone(toy_data_dir, tmp_path):
    checkpoint_path, weights, vae = _large_frozen_run(tmp_path / "run", toy_data_dir, tmp_path)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert not any(k.startswith(("autoencoder.", "conditioner.")) for k in checkpoint["state_dict"])
    assert checkpoint["ldm"]["frozen_sources"]["autoencoder"]["path"] == str(weights.resolve())

    bundle = load_bundle(checkpoint_path)  # no config, no flags: the spec and the source suffice
    assert all(torch.equal(bundle.vae[k], v) for k, v in vae.state_dict().items())

    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, moved)
    with pytest.raises(UserError, match=f"kept in {weights.resolve()}, which is missing"):
        load_bundle(checkpoint_path)
    assert torch.equal(
        load_bundle(checkpoint_path, sources={"autoencoder": str(moved)}).vae["quant_conv.weight"],
        vae.state_dict()["quant_conv.weight"],
    )

    changed = {k: v + 1 for k, v in vae.state_dict().items()}
    save_safetensors(changed, moved)
    with pytest.raises(UserError, match="differ from those the run trained with"):
        load_bundle(checkpoint_path, sources={"autoencoder": str(moved)})


def test_bad_spec_values_are_one_line_errors(tiny_checkpoint, tmp_path):
    def plant(checkpoint):
        checkpoint["ldm"]["spec"]["prediction_type"] = "__import__('os')"

    with pytest.raises(UserError, match="prediction_type must be one of"):
        load_bundle(_rewritten(tiny_checkpoint, tmp_path / "bad.ckpt", plant))


def test_a_checkpoint_from_before_the_spec_still_loads(tiny_checkpoint, tmp_path):
    def legacy(checkpoint):  # what train.py wrote before: the resolved config, frozen parts embedded
        del checkpoint["ldm"]["spec"], checkpoint["ldm"]["frozen_sources"]

    old = load_bundle(_rewritten(tiny_checkpoint, tmp_path / "old.ckpt", legacy))
    new = load_bundle(tiny_checkpoint)
    assert old.metadata() == new.metadata()
    assert all(torch.equal(old.unet[k], new.unet[k]) for k in new.unet)


def test_half_precision_model_files_build_in_float32(tiny_checkpoint):
    bundle = load_bundle(tiny_checkpoint)
    for part in ("unet", "vae", "text"):
        setattr(bundle, part, {k: v.half() for k, v in getattr(bundle, part).items()})
    unet, autoencoder, conditioner = bundle.build()
    assert {p.dtype for m in (unet, autoencoder, conditioner) for p in m.parameters()} == {torch.float32}
    image = autoencoder.decode_from_latent(torch.randn(1, 4, 8, 8))  # fp16 weights meeting fp32 input used to raise
    assert image.dtype == torch.float32 and torch.isfinite(image).all()


def test_convert_takes_the_new_place_of_a_moved_source(toy_data_dir, tmp_path, capsys):
    from ldm.convert import main

    checkpoint_path, weights, _ = _large_frozen_run(tmp_path / "run", toy_data_dir, tmp_path)
    moved = tmp_path / "moved.safetensors"
    shutil.move(weights, moved)
    with pytest.raises(SystemExit):
        main([str(checkpoint_path), str(tmp_path / "out.safetensors"), "--to", "sd"])
    assert "which is missing" in capsys.readouterr().err
    main([str(checkpoint_path), str(tmp_path / "out.safetensors"), "--to", "sd", "--source", f"autoencoder={moved}"])
    assert (tmp_path / "out.safetensors").is_file()
