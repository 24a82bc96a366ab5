"""Tiny SD 1.x- and SD 2.x-shaped pipelines written the way they are published: by diffusers and
transformers themselves, in fp16, with the text encoder under ``text_model.`` (transformers 4.x files).

Only the widths are small; every structural trait of the family is kept: SD 1.x has a quick_gelu text
encoder padded with <|endoftext|>, 1x1-conv transformer projections and one head count everywhere; SD 2.x
a gelu text encoder stored without its last block (SD 2.x reads the penultimate one), padded with "!",
linear projections, one head width everywhere, and a v-prediction scheduler.
"""

import json
import shutil
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

WIDTH, TEXT_LAYERS = 32, 3  # the text tower's width (= cross-attention context) and its blocks
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# the same tiny networks in our configs' keys: overrides that shrink an SD model preset to them
SD_SHAPE_OVERRIDES = [
    "model.unet.model_channels=32",
    "model.unet.channel_multipliers=[1,2]",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[1]",
    f"model.unet.context_dim={WIDTH}",
    "model.autoencoder.module.base_channels=32",
    "model.autoencoder.module.channel_multipliers=[1,2]",
    "model.autoencoder.module.num_res_blocks=1",
    "model.autoencoder.module.resolution=32",
    "model.conditioner.model_name=null",
    f"+model.conditioner.text_cfg={{context_length: 77, vocab_size: 49408, width: {WIDTH}, heads: 2, layers: {TEXT_LAYERS}}}",
]


def write_tokenizer(folder: Path, pad: str) -> None:
    """The tokenizer files of a published SD folder (transformers 4.x): CLIP's real BPE vocabulary
    (the copy open_clip ships: no download), merges, and the special tokens, ``pad`` among them."""
    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": SOT, "<end_of_text>": EOT}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        name: {"content": token, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        for name, token in (("bos_token", SOT), ("eos_token", EOT), ("unk_token", EOT))
    }
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad}))
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **special,
        "pad_token": pad,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return module


def write_published_folder(root: Path, family: str, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A diffusers folder of a tiny ``family`` (sd1 | sd2) model saved by ``save_pretrained``."""
    import diffusers
    import transformers

    sd2 = family == "sd2"
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=[2, 4] if sd2 else 2,
        use_linear_projection=sd2,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408,
            hidden_size=WIDTH,
            intermediate_size=4 * WIDTH,
            num_attention_heads=2,
            num_hidden_layers=TEXT_LAYERS - 1 if sd2 else TEXT_LAYERS,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
    )
    if sd2:
        scheduler = diffusers.DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
    else:
        scheduler = diffusers.PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        )
    for offset, module in enumerate((unet, vae, text)):
        _randomise(module, seed + offset)
    folder, pad = Path(root), "!" if sd2 else EOT
    write_tokenizer(folder / "tokenizer", pad)
    files = [str(folder / "tokenizer" / name) for name in ("vocab.json", "merges.txt")]
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.to(dtype),
        text_encoder=text.to(dtype),
        tokenizer=transformers.CLIPTokenizer(*files, pad_token=pad),
        unet=unet.to(dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")  # transformers 5.x writes tokenizer.json; published folders have 4.x's files
    write_tokenizer(folder / "tokenizer", pad)
    _prefix_text_model(folder / "text_encoder" / "model.safetensors")
    return folder


def _prefix_text_model(path: Path) -> None:
    """Name the text encoder's tensors ``text_model.*``, as transformers 4.x (every published folder) does."""
    save_file(with_text_model_prefix(load_file(str(path))), str(path), metadata={"format": "pt"})


def with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel tensors named as on disk in published folders, whichever transformers made them."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def diffusers_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a diffusers folder as stored: {"unet": ..., "vae": ..., "text_encoder": ...}."""
    files = {
        "unet": "diffusion_pytorch_model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
        "text_encoder": "model.safetensors",
    }
    return {part: load_file(str(Path(folder) / part / name)) for part, name in files.items()}
