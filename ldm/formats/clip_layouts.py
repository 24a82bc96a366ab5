"""State-dict layouts of CLIP's text transformer: open_clip's text tower <-> Hugging Face's CLIPTextModel.

Both are the same network (pre-LN blocks, causal mask, learned positions, a final layer norm); only the
names differ, and open_clip keeps q, k and v fused in one ``in_proj`` of shape (3W, W), rows in the
order q, k, v, as ``nn.MultiheadAttention`` does. SD 1.x checkpoints store OpenAI's ViT-L/14 text
model in the HF layout (``cond_stage_model.transformer.text_model.*``); SD 2.x checkpoints store
OpenCLIP ViT-H/14's text tower in open_clip's (``cond_stage_model.model.*``), while diffusers folders
store SD 2.x's as an HF ``CLIPTextModel`` with 23 of the 24 blocks (SD 2.x reads the penultimate one).

HF names are relative to ``text_model.`` (that prefix is on disk in transformers 4.x files, SD 1.x
checkpoints and diffusers folders; transformers 5.x's in-memory ``CLIPTextModel.state_dict()`` and
its ``save_pretrained`` files have no prefix):

| HF CLIPTextModel                                   | open_clip text tower                      |
|----------------------------------------------------|-------------------------------------------|
| embeddings.token_embedding.weight      (V, W)      | token_embedding.weight       (V, W)       |
| embeddings.position_embedding.weight   (L, W)      | positional_embedding         (L, W)       |
| embeddings.position_ids (a buffer; ignored here)   | -                                         |
| encoder.layers.i.self_attn.{q,k,v}_proj.*  (W, W)  | transformer.resblocks.i.attn.in_proj_* (3W, W) |
| encoder.layers.i.self_attn.out_proj.*              | transformer.resblocks.i.attn.out_proj.*   |
| encoder.layers.i.layer_norm1.* / layer_norm2.*     | transformer.resblocks.i.ln_1.* / ln_2.*   |
| encoder.layers.i.mlp.fc1.* / fc2.*                 | transformer.resblocks.i.mlp.c_fc.* / c_proj.* |
| final_layer_norm.*                                 | ln_final.*                                |
| -                                                  | text_projection (W, D): pooled CLIP embedding |

``embeddings.position_ids`` is ``arange(L)``; SD 1.x single files carry it, so their export adds it
(``ldm.formats.single_file.sd1_text_state``). ``text_projection`` maps the pooled EOT token to CLIP's
joint embedding; per-token conditioning never uses it and HF's CLIPTextModel has no counterpart, so
export drops it and import leaves it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

# HF name of a tensor outside the blocks -> open_clip name
_HF_TO_OC_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# HF module inside encoder.layers.i -> open_clip module inside transformer.resblocks.i (q/k/v apart)
_HF_TO_OC_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # the row order of open_clip's in_proj
_HF_BLOCKS, _OC_BLOCKS = "encoder.layers.", "transformer.resblocks."
_HF_IGNORED = {"embeddings.position_ids"}  # arange(L): a buffer some checkpoints still store
_OC_UNMAPPED_ROOTS = {"text_projection", "attn_mask"}  # no HF counterpart / a non-persistent buffer
_OC_ROOTS = {"token_embedding", "positional_embedding", "transformer", "ln_final"} | _OC_UNMAPPED_ROOTS

Layout = Literal["hf", "open_clip"]


def hf_to_open_clip(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel tensors (names relative to ``text_model.``) -> open_clip text-tower tensors.

    q, k, v (W, W) and their biases (W,) are concatenated into ``in_proj_weight`` (3W, W) and
    ``in_proj_bias`` (3W,); ``embeddings.position_ids`` is skipped; the result has no
    ``text_projection``. Raises KeyError on a name outside the text model or an incomplete q/k/v.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}  # (block, "weight"|"bias") -> {"q_proj": ...}
    for name, tensor in hf_state.items():
        if name in _HF_IGNORED:
            continue
        if name in _HF_TO_OC_TOP:
            out[_HF_TO_OC_TOP[name]] = tensor
            continue
        block, module, param = _split_block_name(name, _HF_BLOCKS)
        if module.startswith("self_attn.") and module[len("self_attn.") :] in _QKV:
            qkv.setdefault((block, param), {})[module[len("self_attn.") :]] = tensor
        elif module in _HF_TO_OC_BLOCK:
            out[f"{_OC_BLOCKS}{block}.{_HF_TO_OC_BLOCK[module]}.{param}"] = tensor
        else:
            raise KeyError(f"not a CLIPTextModel tensor (names relative to 'text_model.'): {name!r}")
    for (block, param), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise KeyError(f"layer {block} lacks {sorted(set(_QKV) - set(parts))} {param}")
        out[f"{_OC_BLOCKS}{block}.attn.in_proj_{param}"] = torch.cat([parts[p] for p in _QKV])  # (3W, ...)
    return out


def open_clip_to_hf(oc_state: Mapping[str, Tensor], num_layers: int | None = None) -> dict[str, Tensor]:
    """open_clip text-tower tensors -> HF CLIPTextModel tensors (names relative to ``text_model.``).

    num_layers: keep only the first blocks, e.g. 23 of ViT-H/14's 24 for SD 2.x, whose context is
        the penultimate block's output; HF's ``last_hidden_state`` (final layer norm included) then
        equals the open_clip tower's tokens after ``num_layers`` blocks and ``ln_final``.
    ``text_projection`` is dropped (no HF counterpart). The q/k/v splits are copies, not views, so
    the result can be saved with safetensors.
    """
    total = count_blocks(oc_state, _OC_BLOCKS)
    num_layers = total if num_layers is None else num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in 1..{total}, got {num_layers}")
    oc_to_hf_top = {v: k for k, v in _HF_TO_OC_TOP.items()}
    oc_to_hf_block = {v: k for k, v in _HF_TO_OC_BLOCK.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in oc_state.items():
        if name.split(".", 1)[0] in _OC_UNMAPPED_ROOTS:
            continue
        if name in oc_to_hf_top:
            out[oc_to_hf_top[name]] = tensor
            continue
        block, module, param = _split_block_name(name, _OC_BLOCKS)
        if block >= num_layers:
            continue
        prefix = f"{_HF_BLOCKS}{block}."
        if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
            for proj, part in zip(_QKV, tensor.chunk(3)):  # rows q, k, v: (W, ...) each
                out[f"{prefix}self_attn.{proj}.{param[len('in_proj_') :]}"] = part.clone()
        elif module in oc_to_hf_block:
            out[f"{prefix}{oc_to_hf_block[module]}.{param}"] = tensor
        else:
            raise KeyError(f"not an open_clip text-tower tensor: {name!r}")
    return out


def hf_text_config(
    oc_state: Mapping[str, Tensor],
    heads: int,
    quick_gelu: bool,
    num_layers: int | None = None,
    layer_norm_eps: float = 1e-5,
) -> dict[str, Any]:
    """``CLIPTextConfig`` keyword arguments for ``open_clip_to_hf(oc_state, num_layers)``.

    Sizes are read from the tensors; the head count and activation are not stored in a state dict.
    ``"gelu"`` (exact, erf) is what ``nn.GELU`` computes: SD 2.x's diffusers config says so too.
    """
    vocab_size, width = oc_state["token_embedding.weight"].shape
    return dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=oc_state[f"{_OC_BLOCKS}0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=count_blocks(oc_state, _OC_BLOCKS) if num_layers is None else num_layers,
        num_attention_heads=heads,
        max_position_embeddings=oc_state["positional_embedding"].shape[0],
        hidden_act="quick_gelu" if quick_gelu else "gelu",
        layer_norm_eps=layer_norm_eps,
        bos_token_id=49406,  # CLIP's <|startoftext|> and <|endoftext|>
        eos_token_id=49407,
    )


def open_clip_text_cfg(hf_config: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """An HF CLIPTextConfig (as a dict) -> (open_clip ``text_cfg``, ``quick_gelu``) of the same tower."""
    text_cfg = dict(
        context_length=hf_config["max_position_embeddings"],
        vocab_size=hf_config["vocab_size"],
        width=hf_config["hidden_size"],
        heads=hf_config["num_attention_heads"],
        layers=hf_config["num_hidden_layers"],
        mlp_ratio=hf_config["intermediate_size"] / hf_config["hidden_size"],
    )
    if hf_config["hidden_act"] not in ("gelu", "quick_gelu"):
        raise ValueError(f"open_clip's text tower has gelu or quick_gelu, not {hf_config['hidden_act']!r}")
    return text_cfg, hf_config["hidden_act"] == "quick_gelu"


def find_text_encoder(state: Mapping[str, Tensor]) -> tuple[Layout, dict[str, Tensor]]:
    """Locate the one CLIP text transformer in a checkpoint: its layout and its tensors, prefix removed.

    HF layout: any prefix ending in ``text_model.`` (SD 1.x ``cond_stage_model.transformer.text_model.``,
    transformers 4.x files and diffusers folders ``text_model.``) or none (transformers 5.x files).
    open_clip layout: any prefix (``""`` for open_clip files, ``cond_stage_model.model.`` for SD 2.x);
    the image tower and ``logit_scale`` of a full CLIP file are left behind. Raises KeyError when
    there is none and ValueError when there are several (e.g. SDXL's two text encoders).
    """
    hf_anchor, oc_anchor = "embeddings.token_embedding.weight", "token_embedding.weight"
    found: list[tuple[Layout, str]] = []
    for name in state:
        if name.endswith(hf_anchor):
            found.append(("hf", name[: -len(hf_anchor)]))
        elif name.endswith(oc_anchor):
            found.append(("open_clip", name[: -len(oc_anchor)]))
    if not found:
        raise KeyError("no CLIP text encoder (no '*token_embedding.weight') among the weights")
    if len(found) > 1:
        raise ValueError(f"several text encoders in the weights, under prefixes {[p for _, p in found]}")
    layout, prefix = found[0]
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if layout == "open_clip":
        picked = {k: v for k, v in picked.items() if k.split(".", 1)[0] in _OC_ROOTS}
    return layout, picked


def count_blocks(state: Mapping[str, Tensor], prefix: str = _OC_BLOCKS) -> int:
    """Number of transformer blocks in a state dict (open_clip layout by default)."""
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise KeyError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _split_block_name(name: str, prefix: str) -> tuple[int, str, str]:
    """``'<prefix>3.mlp.fc1.weight'`` -> ``(3, 'mlp.fc1', 'weight')``; KeyError outside the blocks."""
    if not name.startswith(prefix) or name.count(".") < prefix.count(".") + 2:
        raise KeyError(f"unexpected text-encoder tensor {name!r}")
    index, rest = name[len(prefix) :].split(".", 1)
    module, param = rest.rsplit(".", 1)
    return int(index), module, param
