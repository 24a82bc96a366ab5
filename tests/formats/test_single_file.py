import dataclasses
import json

import pytest
import torch
from bundles import TEXT_CFG, assert_same_tensors, make_bundle
from safetensors.torch import load_file, save_file

from ldm.errors import UserError
from ldm.formats import load_bundle
from ldm.formats.bundle import schedule_from_spec
from ldm.formats.single_file import (
    SD1_TEXT_PREFIX,
    detect_family,
    export_single_file,
    import_single_file,
    single_file_state,
)


def test_round_trip_is_bit_identical(bundle, tmp_path):
    path = export_single_file(bundle, tmp_path / "model.safetensors")
    back = import_single_file(path)
    assert_same_tensors(back.unet, bundle.unet)
    assert_same_tensors(back.vae, bundle.vae)
    used = {k: v for k, v in bundle.text.items() if k != "text_projection"}
    assert_same_tensors({k: v for k, v in back.text.items() if k != "text_projection"}, used)
    assert back.metadata() == bundle.metadata()


def test_keys_follow_the_sd_layout(bundle, tmp_path):
    state = load_file(export_single_file(bundle, tmp_path / "model.safetensors"))
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in state
    if bundle.family == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    else:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_export(bundle, tmp_path, dtype):
    state = load_file(export_single_file(bundle, tmp_path / "half.safetensors", dtype))
    position_ids = state.pop(f"{SD1_TEXT_PREFIX}embeddings.position_ids", None)  # SD 1.x files: int64
    assert {v.dtype for v in state.values()} == {dtype}
    assert (position_ids is None) == (bundle.family != "sd1")
    if position_ids is not None:
        assert position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(77))]


def test_half_precision_file_imports_as_is(bundle, tmp_path):
    back = import_single_file(export_single_file(bundle, tmp_path / "half.safetensors", torch.float16))
    for ours, theirs in ((back.unet, bundle.unet), (back.vae, bundle.vae), (back.text, bundle.text)):
        assert {v.dtype for v in ours.values()} == {torch.float16}
        assert all(torch.equal(v, theirs[k].half()) for k, v in ours.items())
    assert back.metadata() == bundle.metadata()


def test_the_family_is_the_text_encoder_layout_whose_width_the_unet_reads():
    # a foreign SD 1.x / 2.x file: detection by keys and shapes (here on a fake state of the real shapes)
    state = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(49408, 768),
    }
    assert detect_family(state) == "sd1"
    state2 = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
        "cond_stage_model.model.token_embedding.weight": torch.zeros(49408, 1024),
    }
    assert detect_family(state2) == "sd2"


def test_a_foreign_sd1_shaped_file_of_any_width_imports_with_the_architecture_of_its_weights(tmp_path):
    # no metadata: widths, levels, blocks, attention and context come from the tensors, heads from
    # SD 1.x's convention (8 everywhere), so the tiny model reads back with 8 heads instead of its 2
    bundle = make_bundle("sd1")
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in single_file_state(bundle).items()}, str(path))  # no metadata
    back = load_bundle(path)
    assert back.family == "sd1" and back.unet_config == {
        **bundle.unet_config,
        "num_heads": 8,
        "transformer_depth": 1,
        "dropout": 0.0,
        "norm_groups": 32,
    }
    assert back.vae_config == {
        **bundle.vae_config,
        "attention_resolutions": [],
        "resolution": 256,
        "scaling_factor": 0.18215,
        "norm_groups": 32,
        "in_channels": 3,
        "out_channels": 3,
    }  # SD's: no tensor holds them
    assert back.text_config["text_cfg"] == {**TEXT_CFG, "heads": 1, "mlp_ratio": 4.0}  # 32 wide: one 64-wide head
    back.build()  # and the networks build from it and take its weights (strict)


def test_a_foreign_file_whose_widths_do_not_fit_its_familys_heads_is_one_line(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in single_file_state(make_bundle("sd2")).items()}, str(path))
    with pytest.raises(UserError, match=r"attention widths \[32, 64\] do not split into sd2's 64-channel heads"):
        load_bundle(path)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"conditioner.embedders.0.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}, "SDXL"),
        ({"encoder.weight": torch.zeros(1)}, "not a Stable Diffusion checkpoint"),
        (
            {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 512)},
            "unrecognised",
        ),
    ],
)
def test_detection_errors_are_one_line(state, message):
    with pytest.raises(UserError, match=message):
        detect_family(state)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        import_single_file(tmp_path / "nope.safetensors")
    save_file({"encoder.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint"):
        import_single_file(tmp_path / "other.safetensors")


def test_ckpt_files_load_without_unpickling_code(bundle, tmp_path):
    state = load_file(export_single_file(bundle, tmp_path / "model.safetensors"))
    metadata = json.dumps(bundle.metadata())
    torch.save({"state_dict": state, "global_step": 7, "ldm_bundle": metadata}, tmp_path / "model.ckpt")
    back = import_single_file(tmp_path / "model.ckpt")
    assert_same_tensors(back.unet, bundle.unet)
    assert back.family == bundle.family

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": state, "evil": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="not a loadable weights file"):
        import_single_file(tmp_path / "evil.ckpt")


def test_built_models_reproduce_outputs(bundle, tmp_path):
    back = import_single_file(export_single_file(bundle, tmp_path / "m.safetensors"))
    unet_a, vae_a, text_a = bundle.build()
    unet_b, vae_b, text_b = back.build()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 900])
    with torch.no_grad():
        context = text_a(["a red circle", ""])
        assert torch.equal(text_b(["a red circle", ""]), context)
        assert torch.equal(unet_a(x, t, context), unet_b(x, t, context))
        assert torch.equal(vae_a.decode(x), vae_b.decode(x))


def test_a_custom_unet_with_context_pooling_round_trips(tmp_path):
    bundle = make_bundle("sd2", context_pooling=True)
    assert any(k.startswith("context_pool.") for k in bundle.unet)
    back = import_single_file(export_single_file(bundle, tmp_path / "m.safetensors"))
    assert back.family == "custom" and back.unet_config["context_pooling"]
    assert_same_tensors(back.unet, bundle.unet)
    unet = back.build()[0]  # strict load of every tensor, context_pool.* included
    assert unet.context_pool is not None


def test_a_patched_unet_round_trips(tmp_path):
    bundle = make_bundle("sd2", patch_size=2)
    back = import_single_file(export_single_file(bundle, tmp_path / "m.safetensors"))
    assert back.family == "custom" and back.unet_config["patch_size"] == 2
    assert_same_tensors(back.unet, bundle.unet)
    assert back.build()[0].patch_size == 2  # strict load: conv_in takes 4 x 2 x 2 channels


def test_a_self_conditioning_unet_round_trips(tmp_path):
    bundle = make_bundle("sd2", self_conditioning=True)
    back = import_single_file(export_single_file(bundle, tmp_path / "m.safetensors"))
    assert back.family == "custom" and back.unet_config["self_conditioning"]
    assert_same_tensors(back.unet, bundle.unet)
    assert back.build()[0].input_blocks[0][0].in_channels == 8  # strict load: x_t's and the estimate's channels


def test_a_shifted_schedule_round_trips(tmp_path):
    bundle = make_bundle("sd2", context_pooling=True)  # a custom model: its metadata travels
    bundle = dataclasses.replace(bundle, schedule=dict(bundle.schedule, snr_shift=0.25))
    back = import_single_file(export_single_file(bundle, tmp_path / "m.safetensors"))
    assert back.schedule["snr_shift"] == 0.25
    shifted = schedule_from_spec(back.schedule)
    plain = schedule_from_spec(dict(back.schedule, snr_shift=1.0))
    assert torch.allclose(shifted.snr(torch.arange(999)), 0.25 * plain.snr(torch.arange(999)), rtol=1e-9)
