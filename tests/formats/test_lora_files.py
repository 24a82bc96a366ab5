"""LoRA files against the other side's reader: diffusers' ``load_lora_weights`` (with PEFT) applies our
kohya and diffusers exports, a file written by diffusers + PEFT, and a kohya file built here from
sd-scripts' documented key layout, to the very U-Net and text encoder we compute (<= 1e-4 relative);
several LoRAs at their scales merge as diffusers' ``set_adapters`` weighs them; files round-trip
bit for bit; hostile files fail in one line."""

import json

import pytest
import torch
from published import write_published_folder
from safetensors.torch import load_file, save_file

from ldm.errors import UserError
from ldm.formats import load_bundle
from ldm.formats.lora import (
    MAX_TENSORS,
    UNetNames,
    apply_loras,
    export_lora,
    fitted,
    read_lora,
)
from ldm.models.lora import LoRAFactors, LoRANetwork, LoRASpec, LoRAWeights

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

ALL = ("attention", "transformer", "resblocks")
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def published(request, tmp_path_factory):
    """(family, folder, bundle) of a tiny fp16 pipeline saved by diffusers."""
    folder = write_published_folder(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, folder, load_bundle(folder)


def diffusers_pipeline(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=torch.float32, safety_checker=None
    )


def random_lora(bundle, spec: LoRASpec, seed: int = 0) -> LoRAWeights:
    unet, _, text = bundle.build()
    network = LoRANetwork.for_training(spec, unet, text)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return network.weights()


def unet_inputs():
    generator = torch.Generator().manual_seed(7)
    return (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.tensor([10, 600]),
        torch.randn(2, 77, 32, generator=generator),
    )


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_model(bundle, loras, pipe):
    """Our merged U-Net and text encoder (and the U-Net with hooked adapters) compute what ``pipe`` does."""
    merged = apply_loras(bundle, loras)
    unet, _, text = merged.build()
    x, t, context = unet_inputs()
    tokens = pipe.tokenizer(
        ["a photo of sks dog", ""], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        reference = pipe.unet(x, t, encoder_hidden_states=context).sample
        assert relative(unet(x, t, context), reference) < TOLERANCE
        assert relative(text.encode_tokens(tokens), pipe.text_encoder(tokens).last_hidden_state) < TOLERANCE
        if len(loras) == 1 and loras[0][1] == 1.0:  # the training path: the base U-Net with forward hooks
            base_unet, _, _ = bundle.build()
            LoRANetwork.from_weights(LoRAWeights(unet=loras[0][0].unet), base_unet).attach(base_unet)
            assert relative(base_unet(x, t, context), reference) < TOLERANCE
            base = bundle.build()[0](x, t, context)
            assert relative(base, reference) > 0.1  # the LoRA changes the output: the test can fail


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_our_files_load_in_diffusers_to_the_model_we_compute(published, tmp_path, format):
    family, folder, bundle = published
    spec = LoRASpec(rank=4, alpha=8.0, targets=ALL, conv_rank=2, conv_alpha=1.0, text_encoder=True)
    weights = random_lora(bundle, spec)
    path = export_lora(weights, bundle, tmp_path / f"{format}.safetensors", format, torch.float16)
    pipe = diffusers_pipeline(folder)
    pipe.load_lora_weights(str(path))
    assert_same_model(bundle, [(read_lora(path, bundle), 1.0)], pipe)


def test_a_file_written_by_diffusers_and_peft_reads_to_the_same_model(published, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family, folder, bundle = published
    pipe = diffusers_pipeline(folder)
    # as diffusers' train_dreambooth_lora.py does, with alpha != r so the adapter metadata matters
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    )
    pipe.text_encoder.add_adapter(
        LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        weight_name="pytorch_lora_weights.safetensors",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(path)))
    assert any(".lora.down.weight" in k or ".lora_A.weight" in k for k in keys)  # diffusers' own spellings
    weights = read_lora(path, bundle)
    assert weights.metadata["format"] == "diffusers" and {f.alpha / f.rank for f in weights.unet.values()} == {2.0}
    assert_same_model(bundle, [(weights, 1.0)], pipe)


def kohya_name(network: str, module: str) -> str:
    """sd-scripts' lora_name: prefix + "." + module path, every "." then replaced by "_" (networks/lora.py)."""
    return f"lora_{network}.{module}".replace(".", "_")


def handmade_kohya_file(path, family: str, layout: str = "diffusers", alphas: str = "network"):
    """A kohya LoRA as sd-scripts saves it (fp16; ``alpha`` a 0-d fp16 tensor per module; SD 1.x's
    1x1-conv projections with 4-d factors), from the documented key layout: U-Net module names of the
    diffusers U-Net (or of the original layout), text encoder names of the Hugging Face CLIP text model.

    alphas: ``network`` (train_network.py: network_alpha 2 for Linear and 1x1 layers, conv_alpha 1 for
    3x3 convolutions), ``per-module`` (resize_lora.py: each its own), ``missing-first`` (old files)."""
    generator = torch.Generator().manual_seed(11)
    rank = 4
    linear = lambda out_f, in_f: (
        torch.randn(rank, in_f, generator=generator),
        torch.randn(out_f, rank, generator=generator),
    )  # noqa: E731
    conv = lambda out_c, in_c, k: (
        torch.randn(rank, in_c, k, k, generator=generator),
        torch.randn(out_c, rank, 1, 1, generator=generator),
    )  # noqa: E731
    unet = {  # (diffusers name, original-layout name): factors
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        ): linear(32, 32),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        ): linear(32, 32),
        (
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
            "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
        ): linear(32, 32),
        (
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "middle_block.1.transformer_blocks.0.ff.net.0.proj",
        ): linear(512, 64),
        ("down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in"): conv(32, 32, 1)
        if family == "sd1"
        else linear(32, 32),
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"): conv(32, 32, 3),
        ("down_blocks.1.resnets.0.time_emb_proj", "input_blocks.3.0.emb_layers.1"): linear(64, 128),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.2.0.op"): conv(32, 32, 3),
    }
    text = {}  # sd-scripts adapts every projection of CLIPAttention and CLIPMLP
    for layer in range(2):
        for module, shape in (
            ("self_attn.q_proj", (32, 32)),
            ("self_attn.k_proj", (32, 32)),
            ("self_attn.v_proj", (32, 32)),
            ("self_attn.out_proj", (32, 32)),
            ("mlp.fc1", (128, 32)),
            ("mlp.fc2", (32, 128)),
        ):
            text[f"text_model.encoder.layers.{layer}.{module}"] = linear(*shape)
    state = {}
    for index, ((theirs, ours), (down, up)) in enumerate(unet.items()):
        name = kohya_name("unet", theirs if layout == "diffusers" else ours)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = 0.3 * down, 0.3 * up
        if alphas == "per-module" or (alphas == "missing-first" and index):
            state[f"{name}.alpha"] = torch.tensor(float(index + 1))
        elif alphas == "network":
            state[f"{name}.alpha"] = torch.tensor(1.0 if down.ndim == 4 and down.shape[-1] == 3 else 2.0)
    for module, (down, up) in text.items():
        name = kohya_name("te", module)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = 0.3 * down, 0.3 * up
        state[f"{name}.alpha"] = torch.tensor(2.0)
    state = {k: v.to(torch.float16) for k, v in state.items()}
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


def test_a_kohya_file_built_from_the_documented_layout_reads_to_what_diffusers_computes(published, tmp_path):
    family, folder, bundle = published
    path = handmade_kohya_file(tmp_path / "kohya.safetensors", family)
    pipe = diffusers_pipeline(folder)
    pipe.load_lora_weights(str(path))
    weights = read_lora(path, bundle)
    assert len(weights.unet) == 8 and len(weights.text) == 12
    assert {f.alpha for f in weights.unet.values()} == {1.0, 2.0}
    assert_same_model(bundle, [(weights, 1.0)], pipe)


def test_kohya_alphas_are_per_module(published, tmp_path):
    # sd-scripts reads each module's alpha, and a missing one as alpha = rank (create_network_from_weights).
    # (diffusers 0.42 keeps per-module alphas of convolutions and feed-forwards but gives attention
    # projections the file's most common alpha: its alpha keys keep ".processor.to_q_lora.down.weight",
    # so they match no module. Files of resize_lora.py, which sets alpha per module, differ there.)
    family, _, bundle = published
    path = handmade_kohya_file(tmp_path / "resized.safetensors", family, alphas="per-module")
    tensors = load_file(str(path))
    weights = read_lora(path, bundle)
    for ours, f in weights.unet.items():
        theirs = "lora_unet_" + UNetNames.of(bundle.unet_config).diffusers[ours].replace(".", "_")
        down, up = tensors[f"{theirs}.lora_down.weight"].float(), tensors[f"{theirs}.lora_up.weight"].float()
        expected = float(tensors[f"{theirs}.alpha"]) / 4 * (up.flatten(1) @ down.flatten(1))  # closed form
        assert torch.allclose(f.delta().flatten(1), expected, atol=1e-6)
    old = read_lora(handmade_kohya_file(tmp_path / "old.safetensors", family, alphas="missing-first"), bundle)
    assert old.unet["input_blocks.1.1.transformer_blocks.0.attn1.to_q"].alpha == 4.0


def test_kohya_files_in_the_original_layout_read_the_same(published, tmp_path):
    # sd-scripts names SD 1.x/2.x modules as diffusers does; some tools (and ComfyUI's reader) use the
    # original layout: both name the same layers
    family, _, bundle = published
    by_diffusers = read_lora(handmade_kohya_file(tmp_path / "a.safetensors", family, "diffusers"), bundle)
    by_original = read_lora(handmade_kohya_file(tmp_path / "b.safetensors", family, "original"), bundle)
    assert by_diffusers.unet.keys() == by_original.unet.keys()
    for name, f in by_diffusers.unet.items():
        g = by_original.unet[name]
        assert torch.equal(f.down, g.down) and torch.equal(f.up, g.up) and f.alpha == g.alpha


def test_several_loras_at_their_scales_merge_as_diffusers_weighs_them(published, tmp_path):
    family, folder, bundle = published
    a = random_lora(bundle, LoRASpec(rank=4, alpha=4.0, targets=ALL, text_encoder=True), seed=1)
    b = random_lora(bundle, LoRASpec(rank=2, alpha=1.0, targets=["attention"]), seed=2)
    path_a = export_lora(a, bundle, tmp_path / "a.safetensors", "kohya")
    path_b = export_lora(b, bundle, tmp_path / "b.safetensors", "diffusers")
    pipe = diffusers_pipeline(folder)
    pipe.load_lora_weights(str(path_a), adapter_name="a")
    pipe.load_lora_weights(str(path_b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    assert_same_model(bundle, [(read_lora(path_a, bundle), 0.8), (read_lora(path_b, bundle), 0.5)], pipe)


def test_ours_to_kohya_to_ours_is_bit_identical(published, tmp_path):
    _, _, bundle = published
    spec = LoRASpec(rank=4, alpha=0.3, targets=ALL, conv_rank=2, text_encoder=True)  # 0.3: not exact in binary
    weights = random_lora(bundle, spec)
    back = read_lora(export_lora(weights, bundle, tmp_path / "k.safetensors", "kohya"), bundle)
    for ours, theirs in ((weights.unet, back.unet), (weights.text, back.text)):
        assert ours.keys() == theirs.keys()
        for name, f in ours.items():
            g = theirs[name]
            assert f.down.dtype == g.down.dtype == torch.float32
            assert torch.equal(f.down, g.down) and torch.equal(f.up, g.up) and f.alpha == g.alpha, name
    # the diffusers layout folds alpha / r into lora_B: the same update, not the same factors
    via_diffusers = read_lora(export_lora(weights, bundle, tmp_path / "d.safetensors", "diffusers"), bundle)
    for name, f in weights.unet.items():
        assert torch.allclose(f.delta(), via_diffusers.unet[name].delta(), rtol=1e-6, atol=1e-7)


def test_kohya_export_carries_the_metadata_the_tools_show(published, tmp_path):
    family, _, bundle = published
    weights = random_lora(bundle, LoRASpec(rank=8, alpha=4.0, targets=ALL, conv_rank=4, conv_alpha=2.0))
    path = export_lora(
        weights,
        bundle,
        tmp_path / "k.safetensors",
        "kohya",
        info={"base_model": "/models/v1-5.safetensors", "steps": 1200, "resolution": 512},
    )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "4")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert metadata["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2"}[family]
    assert metadata["ss_sd_model_name"] == "v1-5.safetensors" and metadata["ss_steps"] == "1200"
    assert metadata["ss_resolution"] == "(512, 512)" and metadata["modelspec.resolution"] == "512x512"
    assert metadata["modelspec.architecture"].endswith("/lora")


# ---------------------------------------------------------------------- hostile files
@pytest.fixture
def sd1_bundle(tmp_path_factory):
    from bundles import make_bundle

    return make_bundle("sd1")


def kohya_pair(name="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", rank=2, out_f=32, in_f=32):
    return {f"{name}.lora_down.weight": torch.randn(rank, in_f), f"{name}.lora_up.weight": torch.randn(out_f, rank)}


@pytest.mark.parametrize(
    "state, message",
    [
        ({**kohya_pair(), "lora_unet_mid_block_attentions_0_hada_w1_a": torch.zeros(2, 2)}, "1 key"),
        ({**kohya_pair(), **kohya_pair("lora_unet_not_a_layer")}, "2 key"),
        (kohya_pair(out_f=64), "do not fit"),
        (kohya_pair(rank=5000, out_f=32), "do not fit"),
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(
                    2, 32
                )
            },
            "other half",
        ),
        ({**kohya_pair(), "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0)}, "SDXL"),
        (
            {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(32, 32)},
            "neither kohya",
        ),
        ({k: v.to(torch.int32) for k, v in kohya_pair().items()}, "floating-point"),
        (
            {
                **kohya_pair(),
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.ones(3),
            },
            "one number",
        ),
    ],
)
def test_hostile_lora_files_fail_in_one_line(sd1_bundle, tmp_path, state, message):
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError, match=message) as error:
        read_lora(path, sd1_bundle)
    assert "\n" not in str(error.value)


def test_non_finite_factors_are_refused(sd1_bundle, tmp_path):
    state = kohya_pair()
    state[next(iter(state))][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match="non-finite"):
        read_lora(tmp_path / "nan.safetensors", sd1_bundle)


def test_pickled_code_and_garbage_are_refused(sd1_bundle, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"lora_unet_x.lora_down.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="tensors only"):
        read_lora(tmp_path / "evil.pt", sd1_bundle)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors", sd1_bundle)


def test_size_caps_are_checked_from_the_header(sd1_bundle, tmp_path, monkeypatch):
    import ldm.formats.lora as lora_files

    save_file({f"t{i}": torch.zeros(1) for i in range(12)}, str(tmp_path / "many.safetensors"))
    monkeypatch.setattr(lora_files, "MAX_TENSORS", 10)
    with pytest.raises(UserError, match="more than a LoRA file may hold"):
        read_lora(tmp_path / "many.safetensors", sd1_bundle)
    assert MAX_TENSORS >= 10_000
    monkeypatch.setattr(lora_files, "MAX_FILE_BYTES", 100)
    with pytest.raises(UserError, match="more than a LoRA file may be"):
        read_lora(tmp_path / "many.safetensors", sd1_bundle)


def test_custom_unets_export_kohya_in_the_original_layout_and_refuse_diffusers(tmp_path):
    from bundles import make_bundle

    bundle = make_bundle("sd1", patch_size=2)  # the toy's kind of U-Net: diffusers cannot hold it
    assert not UNetNames.of(bundle.unet_config).diffusers
    weights = random_lora(bundle, LoRASpec(rank=2))
    path = export_lora(weights, bundle, tmp_path / "k.safetensors", "kohya")
    assert all(
        k.startswith("lora_unet_input_blocks_") or k.startswith(("lora_unet_middle", "lora_unet_output"))
        for k in load_file(str(path))
    )
    back = fitted(read_lora(path, bundle), bundle)
    assert back.unet.keys() == weights.unet.keys()
    with pytest.raises(UserError, match="--format kohya"):
        export_lora(weights, bundle, tmp_path / "d.safetensors", "diffusers")


def test_factors_of_another_shape_convention_are_fitted(sd1_bundle):
    # a Linear layer's factors stored 4-d (as some tools do) merge like the 2-d ones
    f = LoRAFactors(torch.randn(2, 32), torch.randn(32, 2), 2.0)
    as_4d = LoRAWeights(
        unet={
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q": LoRAFactors(
                f.down[..., None, None], f.up[..., None, None], 2.0
            )
        }
    )
    fitted_4d = fitted(as_4d, sd1_bundle).unet["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    assert torch.equal(fitted_4d.delta(), f.delta())


def test_torch_files_of_tensors_read_like_safetensors(sd1_bundle, tmp_path):
    torch.save(kohya_pair(), tmp_path / "lora.pt")
    weights = read_lora(tmp_path / "lora.pt", sd1_bundle)
    assert (
        list(weights.unet) == ["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
        and weights.unet["input_blocks.1.1.transformer_blocks.0.attn1.to_q"].alpha == 2.0
    )
    torch.save({k: v.long() for k, v in kohya_pair().items()}, tmp_path / "ints.pt")
    with pytest.raises(UserError, match="floating-point"):
        read_lora(tmp_path / "ints.pt", sd1_bundle)


def test_convert_turns_one_lora_layout_into_the_other_given_its_model(published, tmp_path):
    from ldm.convert import main as convert

    _, folder, bundle = published
    weights = random_lora(bundle, LoRASpec(rank=4, alpha=2.0, targets=ALL, text_encoder=True))
    kohya = export_lora(weights, bundle, tmp_path / "k.safetensors", "kohya")
    convert(
        [str(kohya), str(tmp_path / "d.safetensors"), "--to", "lora", "--format", "diffusers", "--base", str(folder)]
    )
    back = read_lora(tmp_path / "d.safetensors", bundle)
    assert back.metadata["format"] == "diffusers" and back.unet.keys() == weights.unet.keys()
    for name, f in weights.unet.items():
        assert torch.allclose(f.delta(), back.unet[name].delta(), atol=1e-6)
