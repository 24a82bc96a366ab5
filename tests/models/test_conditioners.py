import pytest
import torch

from ldm.models.conditioners import OpenCLIPTextEncoder, _pad_after_eot

TINY = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3)
PROMPTS = ["a red circle in the top left", "a blue square in the center", ""]


def tiny(**kwargs) -> OpenCLIPTextEncoder:
    return OpenCLIPTextEncoder(model_name=None, text_cfg=TINY, **kwargs).eval()


def test_hidden_states_shape_and_determinism():
    with torch.no_grad():
        a, b = tiny()(PROMPTS), tiny()(PROMPTS)
    assert a.shape == (3, 77, 32)
    assert torch.equal(a, b)  # the seeded init is rebuilt identically
    assert not torch.equal(a[0], a[1])
    with torch.no_grad():
        assert not torch.equal(tiny(init_seed=1)(PROMPTS), a)


def test_tokens_follow_clip_conventions():
    tokens = tiny().tokenize(["a red circle"])
    assert tokens.shape == (1, 77)
    assert tokens[0, 0].item() == 49406 and tokens[0, 4].item() == 49407 and tokens[0, 5:].eq(0).all()


def test_pad_token_id_fills_after_eot():
    # SD 1.x's CLIPTokenizer pads with EOT; only the positions after the first EOT change
    zero_pad, eot_pad = tiny().tokenize(PROMPTS), tiny(pad_token_id=49407).tokenize(PROMPTS)
    after_eot = zero_pad.eq(49407).long().cumsum(1).gt(0) & zero_pad.ne(49407)
    assert torch.equal(eot_pad, zero_pad.masked_fill(after_eot, 49407))
    assert eot_pad[2].tolist() == [49406] + [49407] * 76
    # id 0 is a real token ("!"), so padding is found by position, not by value
    assert _pad_after_eot(torch.tensor([[49406, 0, 49407, 0, 0]]), 49407, 7).tolist() == [[49406, 0, 49407, 7, 7]]
    with torch.no_grad():
        assert not torch.equal(tiny()(PROMPTS), tiny(pad_token_id=49407)(PROMPTS))


def test_empty_prompt_is_the_unconditional_context():
    encoder = tiny()
    with torch.no_grad():
        uncond = encoder([""])
        assert torch.equal(encoder(["", "x"])[0], uncond[0])
    assert encoder.tokenize([""])[0, :2].tolist() == [49406, 49407]


def test_layer_choice_matches_manual_forward():
    encoder = tiny(layer="penultimate")
    assert encoder.num_blocks == 2
    tokens = encoder.tokenize(PROMPTS)
    tower = encoder.model
    with torch.no_grad():
        x = tower.token_embedding(tokens) + tower.positional_embedding
        for block in tower.transformer.resblocks[:2]:
            x = block(x, attn_mask=tower.attn_mask)
        expected = tower.ln_final(x)
        assert torch.allclose(encoder.encode_tokens(tokens), expected, atol=1e-6)
        last = tiny(layer="last").encode_tokens(tokens)
    assert not torch.allclose(last, expected)
    with pytest.raises(ValueError, match="layer"):
        tiny(layer="middle")


def test_last_layer_matches_open_clip_text_intermediates():
    # open_clip's own forward: the last block's tokens after ln_final
    encoder = tiny(layer="last")
    tokens = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        out = encoder.model.forward_intermediates(
            tokens, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        assert torch.allclose(encoder.encode_tokens(tokens), out["text_intermediates"][-1], atol=1e-6)


def test_named_config_builds_offline():
    encoder = OpenCLIPTextEncoder("ViT-B-32", layer="penultimate")
    assert encoder.context_dim == 512 and encoder.max_length == 77 and encoder.num_blocks == 11
