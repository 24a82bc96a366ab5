"""SD 1.x / 2.x models as people publish them (fp16 diffusers folders written by diffusers itself) go
through our import and exports, and diffusers reads our files back to the very same tensors.

The acceptance of issue 17: diffusers' own converters (``diffusers.loaders.single_file_utils``) read our
single file of a converted diffusers SD 1.x / SD 2.x model back to the original tensors, 0 mismatches,
and ``from_pretrained`` loads our diffusers export.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from published import TEXT_LAYERS, diffusers_tensors, with_text_model_prefix, write_published_folder
from safetensors.torch import load_file, save_file

from ldm.convert import main as convert
from ldm.formats import export_diffusers, export_single_file, load_bundle
from ldm.formats.single_file import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

PROMPTS = ["a photograph of an astronaut riding a horse", ""]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def published(request, tmp_path_factory):
    """(family, folder) of a tiny fp16 pipeline saved by diffusers, as the hub's SD 1.5 / 2.1 are."""
    return request.param, write_published_folder(tmp_path_factory.mktemp(request.param), request.param)


def mismatches(ours: dict, original: dict) -> list[str]:
    """Names of original tensors that ``ours`` lacks, or holds with another dtype or value."""
    return [k for k, v in original.items() if k not in ours or ours[k].dtype != v.dtype or not torch.equal(ours[k], v)]


def test_import_recognises_the_family_at_any_width(published):
    family, folder = published
    bundle = load_bundle(folder)
    assert bundle.family == family
    text = bundle.text_config
    if family == "sd1":  # OpenAI CLIP: quick_gelu, EOT padding, last layer
        assert (text["quick_gelu"], text["pad_token_id"], text["layer"]) == (True, 49407, "last")
        assert text["text_cfg"]["layers"] == TEXT_LAYERS and bundle.prediction_type == "eps"
    else:  # OpenCLIP: gelu, "!" padding; the folder holds all but the last block, which SD 2.x never runs
        assert (text["quick_gelu"], text["pad_token_id"], text["layer"]) == (False, 0, "penultimate")
        assert text["text_cfg"]["layers"] == TEXT_LAYERS and bundle.prediction_type == "v"
    # the formats keep the file's fp16 tensors as they are (the float32 cast is ModelBundle.build's)
    assert {v.dtype for part in (bundle.unet, bundle.vae, bundle.text) for v in part.values()} == {torch.float16}


def test_the_imported_text_encoder_computes_what_diffusers_does(published):
    family, folder = published
    bundle = load_bundle(folder)
    bundle = dataclasses.replace(bundle, text={k: v.float() for k, v in bundle.text.items()})
    ours = bundle.build()[2].float()
    theirs = transformers.CLIPTextModel.from_pretrained(str(folder / "text_encoder")).float()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert tokens.tolist() == ours.tokenize(PROMPTS).tolist()  # same ids, padding included
    with torch.no_grad():
        expected = theirs(tokens).last_hidden_state
        assert (ours.encode_tokens(tokens) - expected).abs().max() < 1e-5


def test_diffusers_converters_read_our_single_file_back(published, tmp_path):
    family, folder = published
    path = export_single_file(load_bundle(folder), tmp_path / "model.safetensors", torch.float16)
    checkpoint, original = load_file(str(path)), diffusers_tensors(folder)
    unet_config = diffusers.UNet2DConditionModel.load_config(str(folder / "unet"))
    vae_config = diffusers.AutoencoderKL.load_config(str(folder / "vae"))
    unet = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config)
    vae = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae_config)
    if family == "sd1":
        assert single_file_utils.is_clip_model(checkpoint) and not single_file_utils.is_open_clip_model(checkpoint)
        text = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
        assert text.pop("text_model.embeddings.position_ids").tolist() == [list(range(77))]  # as SD 1.x files
    else:
        assert single_file_utils.is_open_clip_model(checkpoint) and not single_file_utils.is_clip_model(checkpoint)
        config = transformers.CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
        text = single_file_utils.convert_open_clip_checkpoint(transformers.CLIPTextModel(config), checkpoint)
    for ours, part in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        assert mismatches(ours, original[part]) == [], part
        assert ours.keys() == original[part].keys(), part
    prefix = SD1_TEXT_PREFIX if family == "sd1" else SD2_TEXT_PREFIX
    assert {k.split(".")[0] for k in checkpoint} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith(prefix) for k in checkpoint if k.startswith("cond_stage_model."))


def test_from_single_file_loads_our_single_file(published, tmp_path):
    family, folder = published
    path = export_single_file(load_bundle(folder), tmp_path / "model.safetensors", torch.float16)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None, torch_dtype=torch.float16
    )
    original = diffusers_tensors(folder)
    assert mismatches(pipe.unet.state_dict(), original["unet"]) == []
    assert mismatches(pipe.vae.state_dict(), original["vae"]) == []
    assert mismatches(with_text_model_prefix(pipe.text_encoder.state_dict()), original["text_encoder"]) == []
    assert pipe.scheduler.config.prediction_type == ("epsilon" if family == "sd1" else "v_prediction")


def test_from_pretrained_loads_our_diffusers_export(published, tmp_path):
    family, folder = published
    out = export_diffusers(load_bundle(folder), tmp_path / "pipe", torch.float16)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    written, original = diffusers_tensors(out), diffusers_tensors(folder)
    for part in ("unet", "vae", "text_encoder"):
        assert mismatches(written[part], original[part]) == [] and written[part].keys() == original[part].keys(), part
        assert mismatches(getattr(pipe, part).state_dict(), getattr(reference, part).state_dict()) == [], part
    assert pipe.text_encoder.config.num_hidden_layers == reference.text_encoder.config.num_hidden_layers
    assert pipe.text_encoder.config.hidden_act == reference.text_encoder.config.hidden_act
    assert pipe.tokenizer(PROMPTS).input_ids == reference.tokenizer(PROMPTS).input_ids
    assert pipe.tokenizer.pad_token_id == reference.tokenizer.pad_token_id
    assert pipe.scheduler.config.prediction_type == reference.scheduler.config.prediction_type
    assert pipe.vae.config.scaling_factor == reference.vae.config.scaling_factor


def test_convert_writes_the_family_layout(published, tmp_path, capsys):
    family, folder = published
    convert([str(folder), str(tmp_path / "out.safetensors"), "--to", "sd", "--dtype", "fp16"])
    assert f"diffusers ({family}," in capsys.readouterr().out
    keys = load_file(str(tmp_path / "out.safetensors")).keys()
    text_keys = [k for k in keys if k.startswith("cond_stage_model.")]
    prefix = SD1_TEXT_PREFIX if family == "sd1" else SD2_TEXT_PREFIX
    assert text_keys and all(k.startswith(prefix) for k in text_keys)
    # and our single file reads back as the same family, with the same configs
    back = load_bundle(tmp_path / "out.safetensors")
    assert back.family == family and back.metadata() == load_bundle(folder).metadata()


def test_a_folder_saved_by_transformers_5_imports_too(published, tmp_path):
    """transformers 5.x saves CLIPTextModel without ``text_model.`` and the pad token only in
    tokenizer_config.json: the family must still be recognised."""
    family, folder = published
    copy = shutil.copytree(folder, tmp_path / "pipe")
    weights = copy / "text_encoder" / "model.safetensors"
    save_file({k.removeprefix("text_model."): v for k, v in load_file(str(weights)).items()}, str(weights))
    (copy / "tokenizer" / "special_tokens_map.json").unlink()
    bundle = load_bundle(copy)
    assert bundle.family == family
    assert json.loads((copy / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] in ("!", "<|endoftext|>")
    assert bundle.metadata() == load_bundle(folder).metadata()


def test_a_folder_of_fp16_variant_files_imports(published, tmp_path):
    """``from_pretrained(..., variant="fp16")`` downloads only ``*.fp16.safetensors`` files."""
    family, folder = published
    copy = shutil.copytree(folder, tmp_path / "pipe")
    for part, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        (copy / part / f"{name}.safetensors").rename(copy / part / f"{name}.fp16.safetensors")
    bundle, reference = load_bundle(copy), load_bundle(folder)
    assert bundle.metadata() == reference.metadata()
    for ours, theirs in ((bundle.unet, reference.unet), (bundle.vae, reference.vae), (bundle.text, reference.text)):
        assert mismatches(ours, theirs) == [] and ours.keys() == theirs.keys()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_bf16_folders_convert_losslessly(family, tmp_path):
    folder = write_published_folder(tmp_path / "bf16", family, torch.bfloat16)
    bundle = load_bundle(folder)
    assert {v.dtype for v in bundle.unet.values()} == {torch.bfloat16}
    checkpoint = load_file(str(export_single_file(bundle, tmp_path / "model.safetensors")))  # dtype kept
    unet_config = diffusers.UNet2DConditionModel.load_config(str(folder / "unet"))
    unet = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config)
    assert mismatches(unet, diffusers_tensors(folder)["unet"]) == []
    written = diffusers_tensors(export_diffusers(bundle, tmp_path / "pipe"))
    for part, tensors in diffusers_tensors(folder).items():
        assert mismatches(written[part], tensors) == [], part


# The configs of the published full-size models (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1),
# as far as they differ from diffusers' and transformers' defaults.
_SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=4,
)
FULL_SIZE = {
    "sd1": dict(
        unet=dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64),
        vae=dict(_SD_VAE, sample_size=512),
        text_encoder=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        scheduler=dict(_class_name="PNDMScheduler", prediction_type="epsilon"),
    ),
    "sd2": dict(
        unet=dict(
            cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=96
        ),
        vae=dict(_SD_VAE, sample_size=768),
        text_encoder=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=512,
        ),
        scheduler=dict(_class_name="DDIMScheduler", prediction_type="v_prediction"),
    ),
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_sd15_and_sd21_keys_survive_diffusers_converters(family):
    """Full-size SD 1.5 / 2.1 on the meta device (names and shapes, no memory): folder -> our single
    file -> diffusers' converters gives every original tensor back, the shapes unchanged."""
    from bench.presets import network_configs
    from ldm.formats.architecture import text_config_from_weights, unet_config_from_weights, vae_config_from_weights
    from ldm.formats.diffusers_folder import bundle_from_diffusers
    from ldm.formats.single_file import single_file_state

    configs = FULL_SIZE[family]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**configs["unet"])
        vae = diffusers.AutoencoderKL(**configs["vae"])
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"]))
    weights = {
        "unet": unet.state_dict(),
        "vae": vae.state_dict(),
        "text_encoder": with_text_model_prefix(text.state_dict()),
    }
    weights["text_encoder"].pop("text_model.embeddings.position_ids", None)  # a buffer transformers 4.x may list
    configs = dict(configs, unet=dict(unet.config), vae=dict(vae.config), text_encoder=text.config.to_dict())
    bundle = bundle_from_diffusers(configs, weights, 49407 if family == "sd1" else 0)
    # what the folder's configs say is what a published single file's weights import as, and our preset
    plain = lambda config: json.loads(json.dumps(config))  # noqa: E731 (tuples as lists)
    preset = network_configs("sd15" if family == "sd1" else "sd21_base")
    assert bundle.family == family and bundle.text_config == preset["text"]  # ViT-L-14 / ViT-H-14
    assert text_config_from_weights(bundle.text, family) == preset["text"]
    assert plain(unet_config_from_weights(bundle.unet, family)) == plain(bundle.unet_config)
    assert {k: bundle.unet_config[k] for k in preset["unet"]} == preset["unet"]
    assert plain(vae_config_from_weights(bundle.vae)) == plain({**bundle.vae_config, "resolution": 256})
    state = single_file_state(bundle)
    assert len(state) == {"sd1": 686 + 248 + 197, "sd2": 686 + 248 + 4 + 23 * 12}[family]  # SD 1.5: 1,131 tensors
    converted = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(state, unet.config),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(state, vae.config),
    }
    if family == "sd1":
        converted["text_encoder"] = single_file_utils.convert_ldm_clip_checkpoint(state)
        converted["text_encoder"].pop("text_model.embeddings.position_ids")
    else:
        converted["text_encoder"] = single_file_utils.convert_open_clip_checkpoint(text, state)
    for part, tensors in weights.items():
        assert converted[part].keys() == tensors.keys(), part
        assert all(converted[part][k].shape == v.shape for k, v in tensors.items()), part
