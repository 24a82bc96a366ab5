"""Text conditioners: prompts to the cross-attention context of the U-Net."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from ldm.checkpoints import load_state_dict_file, resolve_path
from ldm.models.clip_layouts import find_text_encoder, hf_text_config, hf_to_open_clip, open_clip_to_hf


class OpenCLIPTextEncoder(nn.Module):
    """The text tower of an open_clip model, returning per-token hidden states (B, L, width).

    model_name: an open_clip config name (``ViT-H-14`` for SD 2.x, ``ViT-L-14`` for SD 1.x); it
        fixes the tower's architecture unless ``text_cfg`` is given.
    text_cfg: an explicit open_clip text config (width, heads, layers, ...) for towers that have
        no named config, such as the toy's.
    pretrained: a local weights file holding the text encoder in any layout ``load_weights``
        knows (an open_clip model or text tower, an SD 1.x or 2.x checkpoint, an HF/diffusers
        CLIPTextModel), or an open_clip pretrained tag resolved from its local cache; None keeps the
        seeded random init (``init_seed``), which is how tests and the toy run offline.
    layer: ``"last"`` (after the final layer norm, SD 1.x), ``"penultimate"`` (the output of the
        second-to-last block, then the final layer norm: SD 2.x), or an int number of blocks to run.
    quick_gelu: the activation of OpenAI's original CLIP weights (SD 1.x's ViT-L/14); also on when
        the named config asks for it (``ViT-L-14-quickgelu``).
    pad_token_id: the id after EOT up to ``max_length``: 0 as open_clip and SD 2.x pad, 49407 (EOT)
        as SD 1.x's HF CLIPTokenizer does. The pad positions are part of the context, so it matters.

    The empty prompt "" encodes to the unconditional context used by classifier-free guidance.
    SD 1.x: ``OpenCLIPTextEncoder("ViT-L-14", quick_gelu=True, layer="last", pad_token_id=49407)``;
    SD 2.x: ``OpenCLIPTextEncoder("ViT-H-14", layer="penultimate")``.
    """

    def __init__(
        self,
        model_name: str | None = "ViT-H-14",
        text_cfg: dict | None = None,
        pretrained: str | None = None,
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
        if pretrained is not None:
            self.load_pretrained(pretrained, model_name)

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

    def load_pretrained(self, pretrained: str, model_name: str | None = None) -> None:
        """Load text-tower weights from a local file or an open_clip tag (never downloads in tests)."""
        path = resolve_path(pretrained)
        if path.exists():
            state = load_state_dict_file(path)
        else:
            if model_name is None:
                raise FileNotFoundError(f"text encoder weights not found: {pretrained}")
            try:
                state = open_clip.create_model(model_name, pretrained=pretrained, device="cpu").state_dict()
            except Exception as error:  # open_clip raises RuntimeError/OSError/HF errors alike
                raise FileNotFoundError(
                    f"text encoder weights {pretrained!r} are neither a local file nor a cached "
                    f"open_clip tag for {model_name}: {error}"
                ) from error
        self.load_weights(state)

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        """Load the one text encoder found in ``state``, in either layout and under any prefix.

        open_clip layout: open_clip files (the image tower is skipped), SD 2.x checkpoints
        (``cond_stage_model.model.*``); HF layout: SD 1.x checkpoints
        (``cond_stage_model.transformer.text_model.*``), transformers and diffusers files.
        """
        layout, tower_state = find_text_encoder(state)
        if layout == "hf":
            tower_state = hf_to_open_clip(tower_state)
        self._load_tower(tower_state)

    def load_state_dict_hf(self, text_model_state: Mapping[str, Tensor]) -> None:
        """Load HF CLIPTextModel weights (names relative to ``text_model.``).

        The HF model may hold fewer layers than the tower, as long as it holds every block this
        encoder runs: diffusers' 23-layer SD 2.x text encoder loads into ``ViT-H-14`` with
        ``layer="penultimate"`` (block 24 keeps its seeded init and is never run) or into a 23-block
        tower with ``layer="last"``; both reproduce the HF ``last_hidden_state``.
        """
        self._load_tower(hf_to_open_clip(text_model_state))

    def state_dict_hf(self) -> dict[str, Tensor]:
        """The blocks this encoder runs as HF CLIPTextModel tensors (names relative to ``text_model.``).

        A ``CLIPTextModel(CLIPTextConfig(**self.hf_config()))`` holding them returns this encoder's
        hidden states as ``last_hidden_state`` (for SD 2.x: the diffusers layout, 23 layers).
        """
        return open_clip_to_hf(self.model.state_dict(), num_layers=self.num_blocks)

    def hf_config(self) -> dict:
        """``CLIPTextConfig`` keyword arguments matching ``state_dict_hf()``."""
        block = self.model.transformer.resblocks[0]
        return hf_text_config(
            self.model.state_dict(),
            heads=block.attn.num_heads,
            quick_gelu=isinstance(block.mlp.gelu, QuickGELU),
            num_layers=self.num_blocks,
            layer_norm_eps=self.model.ln_final.eps,
        )

    def _load_tower(self, tower_state: Mapping[str, Tensor]) -> None:
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
