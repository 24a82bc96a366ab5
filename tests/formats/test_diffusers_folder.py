"""Export to the diffusers folder layout, read back, and load in diffusers/transformers themselves."""

import dataclasses
import json

import pytest
import torch
from bundles import TEXT_CFG, assert_same_tensors, make_bundle

from bench.presets import network_configs
from ldm.errors import UserError
from ldm.formats.diffusers_folder import _text_config, export_diffusers, import_diffusers, text_family

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle in the top left", "a photograph of an astronaut riding a horse", ""]


def test_round_trip_is_bit_identical(bundle, tmp_path):
    back = import_diffusers(export_diffusers(bundle, tmp_path / "pipe"))
    assert_same_tensors(back.unet, bundle.unet)
    assert_same_tensors(back.vae, bundle.vae)
    layers = 2 if bundle.family == "sd2" else 3  # SD 2.x runs (and diffusers keeps) the first 2 of 3 blocks
    used = {
        k: v for k, v in bundle.text.items() if k != "text_projection" and not k.startswith("transformer.resblocks.2.")
    }
    assert_same_tensors(
        {k: v for k, v in back.text.items() if k != "text_projection"},
        used if layers == 2 else {k: v for k, v in bundle.text.items() if k != "text_projection"},
    )
    assert back.prediction_type == bundle.prediction_type and back.schedule == bundle.schedule
    assert back.image_size == bundle.image_size
    # the family is recognised by structure at this small width, and SD 2.x's tower keeps its dropped block
    assert back.family == bundle.family and back.text_config == dict(
        bundle.text_config, text_cfg=dict(TEXT_CFG, mlp_ratio=4.0)
    )
    assert back.vae_config["scaling_factor"] == bundle.vae_config["scaling_factor"]


def test_reimported_model_gives_identical_outputs(bundle, tmp_path):
    back = import_diffusers(export_diffusers(bundle, tmp_path / "pipe"))
    ours, theirs = bundle.build(), back.build()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        context = ours[2](PROMPTS[:2])
        assert torch.equal(theirs[2](PROMPTS[:2]), context)
        assert torch.equal(theirs[0](x, t, context), ours[0](x, t, context))


def test_diffusers_loads_the_export_and_matches(bundle, tmp_path):
    folder = export_diffusers(bundle, tmp_path / "pipe")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
    unet, vae, text = bundle.build()
    tokens = text.tokenize(PROMPTS)
    assert (
        pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids.tolist()
        == tokens.tolist()
    )
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        context = text.encode_tokens(tokens)
        assert (pipe.text_encoder(tokens).last_hidden_state - context).abs().max() < 1e-4
        assert (pipe.unet(x, t, encoder_hidden_states=context).sample - unet(x, t, context)).abs().max() < 1e-4
        assert (pipe.vae.decode(x).sample - vae.decode(x)).abs().max() < 1e-4
    assert pipe.vae.config.scaling_factor == bundle.vae_config["scaling_factor"]
    expected = {"eps": "epsilon", "v": "v_prediction"}[bundle.prediction_type]
    assert pipe.scheduler.config.prediction_type == expected
    # and the whole diffusers pipeline runs on it
    latents = pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


def test_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="non-empty"):
        export_diffusers(make_bundle("sd1"), tmp_path)


def test_import_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        import_diffusers(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({}))
    with pytest.raises(UserError, match="unet/config.json"):
        import_diffusers(tmp_path)


def test_refuses_a_unet_with_context_pooling(tmp_path):
    bundle = make_bundle("sd2", context_pooling=True)
    with pytest.raises(UserError, match="context_pooling"):
        export_diffusers(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_patched_unet(tmp_path):
    bundle = make_bundle("sd2", patch_size=2)
    with pytest.raises(UserError, match="2x2 latent patches"):
        export_diffusers(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_self_conditioning_unet(tmp_path):
    with pytest.raises(UserError, match="self_conditioning"):
        export_diffusers(make_bundle("sd2", self_conditioning=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_shifted_schedule(tmp_path):
    bundle = make_bundle("sd2")
    bundle = dataclasses.replace(bundle, schedule=dict(bundle.schedule, snr_shift=0.25))
    with pytest.raises(UserError, match="snr_shift=0.25"):
        export_diffusers(bundle, tmp_path / "out")


SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
)  # openai/clip-vit-large-patch14
SD21_TEXT = dict(
    SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)  # stabilityai/stable-diffusion-2-1/text_encoder: 23 of ViT-H's 24 blocks


def test_full_size_text_encoders_get_the_family_presets():
    assert text_family(SD15_TEXT, 49407, 768) == "sd1"
    assert _text_config(SD15_TEXT, 49407, "sd1") == network_configs("sd15")["text"]
    assert text_family(SD21_TEXT, 0, 1024) == "sd2"
    assert (
        _text_config(SD21_TEXT, 0, "sd2") == network_configs("sd21_base")["text"]
    )  # ViT-H-14, penultimate: 24 blocks, 23 run


@pytest.mark.parametrize(
    "config, pad, context",
    [
        (SD15_TEXT, 0, 768),  # OpenAI CLIP padded with "!": neither family's tokenizer
        (SD21_TEXT, 49407, 1024),  # OpenCLIP padded with EOT
        (SD15_TEXT, 49407, 1024),  # the U-Net does not attend to this encoder's tokens directly
    ],
)
def test_text_encoders_of_neither_family_stay_custom(config, pad, context):
    assert text_family(config, pad, context) == "custom"
    text_config = _text_config(config, pad, "custom")
    assert text_config["model_name"] is None and text_config["layer"] == "last"
    assert text_config["text_cfg"]["layers"] == config["num_hidden_layers"] and text_config["pad_token_id"] == pad
