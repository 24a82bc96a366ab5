"""LoRA adapters: the update is (alpha / r) up @ down on every layer kind, hooks and merging compute the
same network, the text encoder's fused q/k/v are adapted row by row, and only the adapters learn."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.formats.lora import lora_spec
from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm.models.lora import (
    AdaptedTextEncoder,
    AdaptedUNet,
    LoRAAdapter,
    LoRANetwork,
    LoRASpec,
    lora_delta,
    merge_text,
    merge_unet,
    unet_lora_targets,
)
from ldm.models.unet import UNetModel

UNET = dict(
    model_channels=32,
    channel_multipliers=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2, 1),
    num_heads=2,
    context_dim=32,
    transformer_depth=1,
)
TEXT = dict(model_name=None, text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
ALL = ("attention", "transformer", "resblocks")


def randomised(network: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(std * torch.randn(p.shape, generator=generator))
    return network


@pytest.fixture(params=[False, True], ids=["sd1-conv-proj", "sd2-linear-proj"])
def unet(request):
    torch.manual_seed(0)
    return randomised(UNetModel(**UNET, use_linear_in_transformer=request.param), 0.05).eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    return x, torch.tensor([3, 700]), torch.randn(2, 77, 32, generator=generator)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(6, 5), nn.Conv2d(6, 5, 1), nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 3, stride=2, padding=1)],
    ids=["linear", "1x1", "3x3", "3x3-stride2"],
)
def test_the_update_is_the_product_of_the_factors_on_every_layer_kind(layer):
    # closed form: layer(x) + adapter(x) == the layer with weight W + (alpha / r) up @ down
    adapter = randomised(LoRAAdapter(layer, rank=3, alpha=6.0))
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 9, 9)
    delta = adapter.delta()
    assert delta.shape == layer.weight.shape and adapter.scale == 2.0
    if isinstance(layer, nn.Linear):
        expected = F.linear(x, layer.weight + delta, layer.bias)
    else:
        expected = F.conv2d(x, layer.weight + delta, layer.bias, layer.stride, layer.padding)
    assert torch.allclose(layer(x) + adapter(x), expected, atol=1e-5)
    up, down = adapter.up.weight, adapter.down.weight
    assert torch.allclose(lora_delta(up, down) * 2.0, delta)


def test_a_fresh_adapter_changes_nothing(unet):
    network = LoRANetwork.for_training(LoRASpec(rank=4, targets=ALL), unet)
    x, t, context = inputs()
    with torch.no_grad():
        before = unet(x, t, context)
        network.attach(unet)
        assert torch.equal(unet(x, t, context), before)  # up = 0 (Hu et al. 2021, Sec. 4.1)


def test_target_groups_name_the_layers_kohya_and_diffusers_adapt(unet):
    attention = unet_lora_targets(unet, ["attention"])
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for p in attention)
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k" in attention
    transformer = unet_lora_targets(unet, ["transformer"])
    assert {"input_blocks.1.1.proj_in", "middle_block.1.transformer_blocks.0.ff.net.2"} <= set(transformer)
    resblocks = unet_lora_targets(unet, ["resblocks"])
    assert {
        "input_blocks.1.0.in_layers.2",
        "input_blocks.2.0.op",
        "output_blocks.1.2.conv",
        "input_blocks.3.0.skip_connection",
        "middle_block.0.emb_layers.1",
    } <= set(resblocks)
    assert not set(attention) & set(transformer) | set(transformer) & set(resblocks)


def test_hooks_and_merging_compute_the_same_network(unet):
    spec = LoRASpec(rank=4, alpha=8.0, targets=ALL, conv_rank=2, conv_alpha=1.0)
    network = randomised(LoRANetwork.for_training(spec, unet))
    x, t, context = inputs()
    state = dict(unet.state_dict())
    with torch.no_grad():
        handles = network.attach(unet)
        adapted = unet(x, t, context)
        for handle in handles:
            handle.remove()
        merged_unet = UNetModel(**UNET, use_linear_in_transformer=unet.input_blocks[1][1].use_linear).eval()
        merged_unet.load_state_dict(merge_unet(state, network.weights().unet))
        merged = merged_unet(x, t, context)
    assert (merged - adapted).abs().max() / adapted.abs().max() < 1e-5
    assert (adapted - unet(x, t, context)).abs().max() > 0.01 * adapted.abs().max()  # the adapters did something
    conv = network.unet_adapter("input_blocks.1.0.in_layers.2")
    assert (conv.rank, conv.alpha) == (2, 1.0) and network.unet_adapter("input_blocks.1.1.proj_in").rank == 4


def test_adapted_unet_applies_its_source_only_during_its_call(unet):
    network = LoRANetwork.for_training(LoRASpec(rank=2), unet)
    other = randomised(LoRANetwork.for_training(LoRASpec(rank=2), unet))
    network.attach(unet)
    x, t, context = inputs()
    with torch.no_grad():
        plain = unet(x, t, context)  # network's own adapters: still zero
        with_other = AdaptedUNet(unet, network, other)(x, t, context)
        assert torch.equal(unet(x, t, context), plain) and not torch.allclose(with_other, plain)


def test_text_encoder_adapts_q_k_v_rows_of_the_fused_projection():
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder(**TEXT).eval()
    network = randomised(LoRANetwork.for_training(LoRASpec(rank=2, text_encoder=True), UNetModel(**UNET), encoder))
    assert len(network.text_names) == 2 * 6  # q, k, v, out_proj, c_fc, c_proj per block
    prompts = ["a red circle in the top left", ""]
    with torch.no_grad():
        adapted = AdaptedTextEncoder(encoder, network)(prompts)
        tower = merge_text(dict(encoder.model.state_dict()), network.weights().text, encoder.num_blocks)
        merged = OpenCLIPTextEncoder(**TEXT).eval()
        merged.model.load_state_dict(tower)
        assert torch.allclose(adapted, merged(prompts), atol=1e-5)
        # the q adapter of block 0 changes the first third of in_proj_weight only
        q = network.text_adapter("transformer.resblocks.0.attn.q")
        only_q = merge_text(dict(encoder.model.state_dict()), {"transformer.resblocks.0.attn.q": q.factors()}, 2)
        change = (
            only_q["transformer.resblocks.0.attn.in_proj_weight"]
            - encoder.model.transformer.resblocks[0].attn.in_proj_weight
        )
        assert change[32:].abs().max() == 0 and change[:32].abs().max() > 0


def test_only_the_adapters_receive_gradients(unet):
    encoder = OpenCLIPTextEncoder(**TEXT).eval().requires_grad_(False)
    unet.requires_grad_(False)
    network = LoRANetwork.for_training(LoRASpec(rank=2, targets=ALL, text_encoder=True), unet, encoder)
    network.attach(unet)
    with torch.no_grad():
        for adapter in network.modules():
            if isinstance(adapter, LoRAAdapter):
                adapter.up.weight.normal_(0, 0.01)  # gradients reach `down` only through a non-zero `up`
    x, t, _ = inputs()
    context = AdaptedTextEncoder(encoder, network)(["a red circle", "a blue square"])
    unet(x, t, context).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert all(p.grad is None for p in (*unet.parameters(), *encoder.parameters()))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(rank=-1), "task.lora.rank"),
        (dict(rank=4, alpha=0), "task.lora.alpha"),
        (dict(rank=4, targets=["mlp"]), "task.lora.targets"),
        (dict(rank=4, colour="red"), "no key"),
        (dict(rank=4, alpha=math.inf), "task.lora.alpha"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(config, message):
    with pytest.raises(UserError, match=message):
        lora_spec(config)


def test_alpha_is_stored_as_float32_so_files_round_trip_it_exactly():
    spec = LoRASpec(rank=4, alpha=0.1)
    assert spec.alpha == float(torch.tensor(0.1, dtype=torch.float32)) and spec.rank_alpha(nn.Linear(2, 2)) == (
        4,
        spec.alpha,
    )
    assert LoRASpec(rank=4).rank_alpha(nn.Conv2d(2, 2, 3)) == (4, 4.0)  # alpha null: = rank
