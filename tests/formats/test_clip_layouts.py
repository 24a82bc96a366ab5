"""open_clip <-> Hugging Face CLIP text layouts: numerical parity with transformers' CLIPTextModel."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoints import save_safetensors
from ldm.formats.clip_layouts import (
    find_text_encoder,
    hf_to_open_clip,
    open_clip_text_cfg,
    open_clip_to_hf,
)
from ldm.formats.text_encoder import load_text_weights_hf, open_clip_text_encoder, text_config_hf, text_state_hf
from ldm.models.conditioners import OpenCLIPTextEncoder

PROMPTS = ["a red circle in the top left", "a blue square in the center!", ""]
EOT = 49407
# OpenAI CLIP's text-model conventions, at toy sizes
HF_TINY = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=EOT,
    pad_token_id=EOT,
)
OC_TINY = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3)


def randomise_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter ~ N(0, std^2), biases and norms included: default inits (zero biases, unit
    norms, tiny q/k) would let a swapped or dropped tensor slip under the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module.eval()


def tiny_hf(seed: int = 0, **overrides) -> CLIPTextModel:
    return randomise_(CLIPTextModel(CLIPTextConfig(**{**HF_TINY, **overrides})), seed)


def sd1_encoder(hf: CLIPTextModel, **kwargs) -> OpenCLIPTextEncoder:
    text_cfg, quick_gelu = open_clip_text_cfg(hf.config.to_dict())
    kwargs = dict(quick_gelu=quick_gelu, layer="last", pad_token_id=EOT) | kwargs
    return open_clip_text_encoder(model_name=None, text_cfg=text_cfg, **kwargs).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_sd1_hf_text_model_parity():
    hf = tiny_hf()
    encoder = sd1_encoder(hf)
    load_text_weights_hf(encoder, hf.state_dict())
    tokens = encoder.tokenize(PROMPTS)  # padded with EOT, as SD 1.x's CLIPTokenizer does
    assert tokens[0, -1].item() == EOT
    with torch.no_grad():
        expected = hf(input_ids=tokens).last_hidden_state  # causal mask only, as SD 1.x calls it
        ours = encoder(PROMPTS)
        assert max_diff(ours, expected) <= 1e-4
        assert torch.equal(ours, encoder.encode_tokens(tokens))
        # the check can fail: q and k exchanged is far off
        swapped = {
            k.replace("q_proj", "@").replace("k_proj", "q_proj").replace("@", "k_proj"): v
            for k, v in hf.state_dict().items()
        }
        load_text_weights_hf(encoder, swapped)
        assert max_diff(encoder(PROMPTS), expected) > 1e-2


def test_hf_open_clip_round_trips_are_bit_identical():
    hf_state = tiny_hf().state_dict()
    back = open_clip_to_hf(hf_to_open_clip(hf_state))
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)

    tower_state = randomise_(OpenCLIPTextEncoder(model_name=None, text_cfg=OC_TINY).model, 1).state_dict()
    again = hf_to_open_clip(open_clip_to_hf(tower_state))
    assert again.keys() == tower_state.keys() - {"text_projection"}  # no HF counterpart
    assert all(torch.equal(again[k], tower_state[k]) for k in again)


def test_position_ids_are_ignored_and_strangers_rejected():
    hf_state = tiny_hf().state_dict()
    with_ids = {**hf_state, "embeddings.position_ids": torch.arange(77)[None]}
    assert hf_to_open_clip(with_ids).keys() == hf_to_open_clip(hf_state).keys()
    with pytest.raises(KeyError, match="text_projection.weight"):
        hf_to_open_clip({**hf_state, "text_projection.weight": torch.zeros(1)})
    del hf_state["encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(KeyError, match="layer 1 lacks"):
        hf_to_open_clip(hf_state)


def sd2_encoder(seed: int | None, **kwargs) -> OpenCLIPTextEncoder:
    kwargs = dict(text_cfg=OC_TINY, layer="penultimate") | kwargs
    encoder = OpenCLIPTextEncoder(model_name=None, **kwargs)
    return randomise_(encoder, seed) if seed is not None else encoder.eval()


def test_sd2_export_to_hf_drops_the_unused_last_block():
    encoder = sd2_encoder(seed=2)  # gelu, 3 blocks, context = penultimate block then ln_final
    config = text_config_hf(encoder)
    assert config["num_hidden_layers"] == 2 and config["hidden_act"] == "gelu"
    hf = CLIPTextModel(CLIPTextConfig(**config)).eval()
    hf.load_state_dict(text_state_hf(encoder), strict=True)
    tokens = encoder.tokenize(PROMPTS)  # zero padding, as SD 2.x and diffusers' SD 2.x tokenizer
    with torch.no_grad():
        ours = encoder.encode_tokens(tokens)
        assert max_diff(hf(input_ids=tokens).last_hidden_state, ours) <= 1e-4
        # back: a full tower whose unused last block keeps its own init, or a tower one block short
        full = sd2_encoder(seed=None, init_seed=5)
        load_text_weights_hf(full, hf.state_dict())
        short = sd2_encoder(seed=None, text_cfg={**OC_TINY, "layers": 2}, layer="last")
        load_text_weights_hf(short, hf.state_dict())
        assert torch.equal(full.encode_tokens(tokens), ours)
        assert torch.equal(short.encode_tokens(tokens), ours)


def test_loading_requires_every_block_that_runs():
    hf_two_layers = tiny_hf(num_hidden_layers=2).state_dict()
    with pytest.raises(KeyError, match="missing .*resblocks.2"):
        load_text_weights_hf(sd2_encoder(seed=None, layer="last"), hf_two_layers)
    with pytest.raises(KeyError, match="unexpected .*resblocks.3"):
        load_text_weights_hf(sd2_encoder(seed=None), tiny_hf(num_hidden_layers=4).state_dict())


def test_sd_checkpoints_load_from_either_layout(tmp_path):
    hf = tiny_hf(seed=3)
    reference = sd1_encoder(hf)
    load_text_weights_hf(reference, hf.state_dict())
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    sd1 = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in hf.state_dict().items()}
    sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_safetensors(sd1 | unet, tmp_path / "sd1.safetensors")
    sd2 = {f"cond_stage_model.model.{k}": v for k, v in reference.model.state_dict().items()}
    torch.save({"state_dict": sd2 | unet}, tmp_path / "sd2.ckpt")
    with torch.no_grad():
        expected = reference(PROMPTS)
        for path in ("sd1.safetensors", "sd2.ckpt"):
            loaded = sd1_encoder(hf, init_seed=9, pretrained=str(tmp_path / path))
            assert torch.equal(loaded(PROMPTS), expected), path


def test_find_text_encoder_prefixes():
    tower = {"token_embedding.weight": 0, "transformer.resblocks.0.ln_1.weight": 1, "text_projection": 2}
    full_clip = {**tower, "visual.positional_embedding": 3, "visual.conv1.weight": 4, "logit_scale": 5}
    assert find_text_encoder(full_clip) == ("open_clip", tower)
    hf = {"embeddings.token_embedding.weight": 0, "final_layer_norm.weight": 1}
    assert find_text_encoder(hf) == ("hf", hf)  # a transformers 5.x file: no prefix
    diffusers = {f"text_model.{k}": v for k, v in hf.items()} | {"vision_model.x": 6}
    assert find_text_encoder(diffusers) == ("hf", hf)
    sdxl = {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in hf.items()}
    sdxl |= {f"conditioner.embedders.1.model.{k}": v for k, v in tower.items()}
    with pytest.raises(ValueError, match="several text encoders"):
        find_text_encoder(sdxl)
    with pytest.raises(KeyError, match="no CLIP text encoder"):
        find_text_encoder({"model.diffusion_model.x": 0})


# The published configs of the real encoders (openai/clip-vit-large-patch14's text model; the
# text_encoder/config.json of stabilityai/stable-diffusion-2-1), as far as the network goes.
REAL = {
    "sd1": (
        dict(model_name="ViT-L-14", quick_gelu=True, layer="last", pad_token_id=EOT),
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
        ),
    ),
    "sd2": (
        dict(model_name="ViT-H-14", layer="penultimate"),
        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu"),
    ),
}


@pytest.mark.parametrize("name", REAL)
def test_real_configs_map_one_to_one(name):
    kwargs, published = REAL[name]
    with torch.device("meta"):  # structure only: no 350M-parameter init on CPU
        encoder = OpenCLIPTextEncoder(**kwargs)
        config = text_config_hf(encoder)
        hf_state = CLIPTextModel(CLIPTextConfig(**config)).state_dict()
    assert published.items() <= config.items()
    assert config["max_position_embeddings"] == 77 and config["vocab_size"] == 49408
    exported = text_state_hf(encoder)
    assert exported.keys() == hf_state.keys()
    assert all(exported[k].shape == hf_state[k].shape for k in hf_state)
    imported, tower = hf_to_open_clip(hf_state), encoder.model.state_dict()
    unused = {k for k in tower if k == "text_projection" or k.startswith("transformer.resblocks.23.")}
    assert imported.keys() == tower.keys() - unused
    assert all(imported[k].shape == tower[k].shape for k in imported)


def test_quickgelu_config_name_turns_quick_gelu_on():
    with torch.device("meta"):
        blocks = OpenCLIPTextEncoder("ViT-L-14-quickgelu").model.transformer.resblocks
    assert type(blocks[0].mlp.gelu).__name__ == "QuickGELU"
