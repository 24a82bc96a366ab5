"""Text conditioners: prompts to the cross-attention context of the U-Net."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import Tensor, nn


class OpenCLIPTextEncoder(nn.Module):
    """The text tower of an open_clip model, returning per-token hidden states (B, L, width).

    model_name: an open_clip config name (``ViT-H-14`` for SD 2.x, ``ViT-L-14`` for SD 1.x); it
        fixes the tower's architecture unless ``text_cfg`` is given.
    text_cfg: an explicit open_clip text config (width, heads, layers, ...) for towers that have
        no named config, such as the toy's.
    init_seed: the seed of the random init, so that a tower rebuilt anywhere is the same one (the
        toy's text tower stays at it); weights from files are loaded by ``ldm.formats.text_encoder``.
    layer: ``"last"`` (after the final layer norm, SD 1.x), ``"penultimate"`` (the output of the
        second-to-last block, then the final layer norm: SD 2.x), or an int number of blocks to run.
    quick_gelu: the activation of OpenAI's original CLIP weights (SD 1.x's ViT-L/14); also on when
        the named config asks for it (``ViT-L-14-quickgelu``).
    pad_token_id: the id after EOT up to ``max_length``: 0 as open_clip and SD 2.x pad, 49407 (EOT)
        as SD 1.x's HF CLIPTokenizer does. The pad positions are part of the context, so it matters.

    The empty prompt "" encodes to the unconditional context used by classifier-free guidance.
    SD 1.x: ``OpenCLIPTextEncoder("ViT-L-14", quick_gelu=True, layer="last", pad_token_id=49407)``;
    SD 2.x: ``OpenCLIPTextEncoder("ViT-H-14", layer="penultimate")``. The network only: loading its
    weights from a checkpoint of any layout is ``ldm.formats.text_encoder``'s job.
    """

    def __init__(
        self,
        model_name: str | None = "ViT-H-14",
        text_cfg: dict | None = None,
        layer: str | int = "last",
        quick_gelu: bool = False,
        init_seed: int = 0,
        pad_token_id: int = 0,
    ):
        super().__init__()
        if text_cfg is None:
            if model_name is None:
                raise ValueError("give an open_clip model_name or an explicit text_cfg")
            config = open_clip.get_model_config(model_name)
            if config is None:
                raise ValueError(f"unknown open_clip model config {model_name!r}")
            text_cfg, embed_dim = dict(config["text_cfg"]), config["embed_dim"]
            quick_gelu = quick_gelu or config.get("quick_gelu", False)
        else:
            text_cfg, embed_dim = dict(text_cfg), text_cfg.get("width", 512)
        with torch.random.fork_rng(devices=[]):
            # a fixed seed makes the random tower identical wherever it is rebuilt (toy, tests)
            torch.manual_seed(init_seed)
            self.model = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
        self.tokenizer = _tokenizer(model_name, self.model.context_length)
        self.pad_token_id = pad_token_id
        self.num_blocks = _blocks_to_run(layer, len(self.model.transformer.resblocks))

    @property
    def context_dim(self) -> int:
        """Width of each token's hidden state: the U-Net's cross-attention context dimension."""
        return self.model.transformer.width

    @property
    def max_length(self) -> int:
        return self.model.context_length

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> token ids (B, max_length), SOT ... EOT then ``pad_token_id``, truncated to fit."""
        tokens = self.tokenizer(list(prompts))  # (B, L), zero after EOT
        return _pad_after_eot(tokens, self.tokenizer.eot_token_id, self.pad_token_id)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> hidden states (B, max_length, context_dim)."""
        tokens = self.tokenize(prompts).to(self.model.token_embedding.weight.device)
        return self.encode_tokens(tokens)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids (B, L) -> hidden states (B, L, width) at the chosen layer, after ln_final."""
        tower = self.model
        x = tower.token_embedding(tokens) + tower.positional_embedding[: tokens.shape[1]]  # (B, L, W)
        mask = tower.attn_mask[: tokens.shape[1], : tokens.shape[1]] if tower.attn_mask is not None else None
        if not tower.transformer.batch_first:
            x = x.transpose(0, 1)  # (L, B, W)
        for block in tower.transformer.resblocks[: self.num_blocks]:
            x = block(x, attn_mask=mask)
        if not tower.transformer.batch_first:
            x = x.transpose(0, 1)  # (B, L, W)
        return tower.ln_final(x)  # (B, L, W)

    def load_tower(self, tower_state: Mapping[str, Tensor]) -> None:
        """Load open_clip-layout tensors, requiring every one that shapes this encoder's output.

        ``text_projection`` (CLIP's pooled embedding) and blocks past ``num_blocks`` are never run,
        so they may be absent (HF files have no projection; diffusers' SD 2.x has 23 of 24 blocks)
        and keep their seeded init.
        """
        result = self.model.load_state_dict(dict(tower_state), strict=False)
        missing = [k for k in result.missing_keys if self._is_used(k)]
        if missing or result.unexpected_keys:
            raise KeyError(
                f"text encoder weights do not fit the tower: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )

    def used_state(self, tower_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The tensors of ``tower_state`` (open_clip layout) that take part in ``encode_tokens``: what a
        model file should hold of this encoder (SD 2.x's last block, never run, is left out as in
        diffusers folders, rather than exported with the seeded init it keeps when loaded from one)."""
        return {name: value for name, value in tower_state.items() if self._is_used(name)}

    def _is_used(self, name: str) -> bool:
        """Whether the tower tensor ``name`` takes part in ``encode_tokens``."""
        if name.split(".", 1)[0] == "text_projection":
            return False
        block = re.match(r"transformer\.resblocks\.(\d+)\.", name)
        return block is None or int(block.group(1)) < self.num_blocks


def _tokenizer(model_name: str | None, context_length: int):
    if model_name is not None and open_clip.get_model_config(model_name) is not None:
        return open_clip.get_tokenizer(model_name)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _blocks_to_run(layer: str | int, num_blocks: int) -> int:
    if layer == "last":
        return num_blocks
    if layer == "penultimate":
        return num_blocks - 1
    if isinstance(layer, int) and 1 <= layer <= num_blocks:
        return layer
    raise ValueError(f"layer must be 'last', 'penultimate' or 1..{num_blocks}, got {layer!r}")


def _pad_after_eot(tokens: Tensor, eot: int, pad: int) -> Tensor:
    """Token ids (B, L) with every position after the first EOT set to ``pad``.

    Not a plain replace of zeros: id 0 is also a real token ("!").
    """
    is_eot = tokens.eq(eot).long()  # (B, L)
    after_eot = (is_eot.cumsum(1) - is_eot) > 0  # (B, L): an EOT came strictly before
    return tokens.masked_fill(after_eot, pad)
