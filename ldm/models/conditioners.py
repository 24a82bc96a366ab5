"""Text conditioners: prompts to the cross-attention context of the U-Net."""

from __future__ import annotations

from typing import Sequence

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import Tensor, nn

from ldm.checkpoints import load_state_dict_file, resolve_path


class OpenCLIPTextEncoder(nn.Module):
    """The text tower of an open_clip model, returning per-token hidden states (B, L, width).

    model_name: an open_clip config name (``ViT-H-14`` for SD 2.x, ``ViT-L-14`` for SD 1.x); it
        fixes the tower's architecture unless ``text_cfg`` is given.
    text_cfg: an explicit open_clip text config (width, heads, layers, ...) for towers that have
        no named config, such as the toy's.
    pretrained: a local weights file (safetensors or a torch state dict of the full open_clip model
        or of its text tower), or an open_clip pretrained tag resolved from its local cache; None
        keeps the seeded random init (``init_seed``), which is how tests and the toy run offline.
    layer: ``"last"`` (after the final layer norm, SD 1.x), ``"penultimate"`` (the output of the
        second-to-last block, then the final layer norm: SD 2.x), or an int number of blocks to run.
    quick_gelu: the activation of OpenAI's original CLIP weights (SD 1.x's ViT-L/14).

    The empty prompt "" encodes to the unconditional context used by classifier-free guidance.
    """

    def __init__(
        self,
        model_name: str | None = "ViT-H-14",
        text_cfg: dict | None = None,
        pretrained: str | None = None,
        layer: str | int = "last",
        quick_gelu: bool = False,
        init_seed: int = 0,
    ):
        super().__init__()
        if text_cfg is None:
            if model_name is None:
                raise ValueError("give an open_clip model_name or an explicit text_cfg")
            config = open_clip.get_model_config(model_name)
            if config is None:
                raise ValueError(f"unknown open_clip model config {model_name!r}")
            text_cfg, embed_dim = dict(config["text_cfg"]), config["embed_dim"]
        else:
            text_cfg, embed_dim = dict(text_cfg), text_cfg.get("width", 512)
        with torch.random.fork_rng(devices=[]):
            # a fixed seed makes the random tower identical wherever it is rebuilt (toy, tests)
            torch.manual_seed(init_seed)
            self.model = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
        self.tokenizer = _tokenizer(model_name, self.model.context_length)
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
        """Prompts -> token ids (B, max_length), SOT ... EOT then zero padding, truncated to fit."""
        return self.tokenizer(list(prompts))

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
        self.model.load_state_dict(_text_tower_keys(state, self.model), strict=True)


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


def _text_tower_keys(state: dict[str, Tensor], tower: nn.Module) -> dict[str, Tensor]:
    """Keep the text tower's entries of a full open_clip state dict (dropping visual.*, logit_scale)."""
    wanted = set(tower.state_dict())
    for prefix in ("", "model.", "cond_stage_model.model."):
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in wanted}
        if len(picked) == len(wanted):
            return picked
    missing = sorted(wanted - {k.split("model.", 1)[-1] for k in state})[:5]
    raise KeyError(f"weights file lacks text-tower keys such as {missing}")
