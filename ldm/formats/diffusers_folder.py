"""The diffusers folder layout of a Stable Diffusion pipeline.

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}      UNet2DConditionModel
    vae/{config.json, diffusion_pytorch_model.safetensors}       AutoencoderKL
    text_encoder/{config.json, model.safetensors}                transformers CLIPTextModel
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    scheduler/scheduler_config.json

Weights are renamed by ``ldm.formats.diffusers_layout`` and ``ldm.formats.clip_layouts``; configs are
written so that ``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` loads the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor

from ldm import atomic
from ldm.checkpoints import load_state_dict_file, save_safetensors
from ldm.diffusion.schedules import ScheduleSpec
from ldm.errors import UserError
from ldm.formats.architecture import FAMILIES
from ldm.formats.bundle import ModelBundle
from ldm.formats.clip_layouts import count_blocks, hf_text_config, hf_to_open_clip, open_clip_text_cfg, open_clip_to_hf
from ldm.formats.diffusers_layout import (
    unet_config_from_diffusers,
    unet_diffusers_config,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_from_diffusers,
    vae_to_diffusers,
)

DIFFUSERS_VERSION = "0.42.1"  # recorded in the configs; diffusers does not read it
_SCHEDULE_KINDS = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
EOT, SOT = "<|endoftext|>", "<|startoftext|>"
_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# then the fp16 variant alone, as `from_pretrained(variant="fp16")` downloads it (SD 1.5's and 2.1's repos)
WEIGHT_FILES = _WEIGHT_NAMES + tuple(name.replace(".", ".fp16.", 1) for name in _WEIGHT_NAMES)


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"diffusers folder is missing {path.parent.name}/{path.name}")
    return json.loads(path.read_text())


def _read_weights(folder: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
    raise UserError(f"no weights file in {folder} (looked for {', '.join(WEIGHT_FILES)})")


def import_diffusers(path: str | Path) -> ModelBundle:
    """Read a diffusers Stable Diffusion folder into a ``ModelBundle`` (SD 1.x, 2.x or other sizes)."""
    root = Path(path).expanduser()
    if not is_diffusers_folder(root):
        raise UserError(f"not a diffusers pipeline folder (no model_index.json): {root}")
    configs = {part: _read_json(root / part / "config.json") for part in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = _read_json(root / "scheduler" / "scheduler_config.json")
    weights = {part: _read_weights(root / part) for part in ("unet", "vae", "text_encoder")}
    return bundle_from_diffusers(configs, weights, _pad_token_id(root / "tokenizer"))


def bundle_from_diffusers(
    configs: dict[str, dict[str, Any]], weights: dict[str, dict[str, Tensor]], pad_token_id: int
) -> ModelBundle:
    """A bundle of a diffusers pipeline's parts: ``configs`` of unet, vae, text_encoder and scheduler
    (their JSON files), ``weights`` of the first three (as stored), the tokenizer's pad token id.

    The family (``sd1``/``sd2``, else ``custom``) is recognised by structure, not size (see
    ``text_family``), so small SD-shaped models export in their family's single-file layout too.
    Tensors keep the file's dtype (fp16 for most published folders) and are renamed, never copied.
    """
    unet_config = unet_config_from_diffusers(configs["unet"])
    vae_config = vae_config_from_diffusers(configs["vae"])
    hf_config, scheduler = configs["text_encoder"], configs["scheduler"]
    text_state = {k.removeprefix("text_model."): v for k, v in weights["text_encoder"].items()}
    family = text_family(hf_config, pad_token_id, unet_config["context_dim"])
    return ModelBundle(
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=_text_config(hf_config, pad_token_id, family),
        unet=unet_from_diffusers(weights["unet"], unet_config),
        vae=vae_from_diffusers(weights["vae"], vae_config),
        text=hf_to_open_clip(text_state),
        family=family,
        prediction_type={"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[
            scheduler.get("prediction_type", "epsilon")
        ],
        image_size=int(configs["vae"].get("sample_size", 512)),
        schedule=_schedule_spec(scheduler),
    )


def text_family(hf_config: dict[str, Any], pad_token_id: int, context_dim: int) -> str:
    """``sd1``, ``sd2`` or ``custom``: which SD family a diffusers text encoder belongs to, at any width.

    SD 1.x's is OpenAI's CLIP text model (quick_gelu) padded with <|endoftext|> (49407); SD 2.x's is
    OpenCLIP's (exact gelu) padded with "!" (0). Either way the U-Net attends to its tokens directly
    (context width = text width). Anything else keeps our own layout (``custom``).
    """
    if int(hf_config["hidden_size"]) != int(context_dim):
        return "custom"
    activation = hf_config.get("hidden_act")
    if activation == "quick_gelu" and pad_token_id == 49407:
        return "sd1"
    if activation == "gelu" and pad_token_id == 0:
        return "sd2"
    return "custom"


def _text_config(hf_config: dict[str, Any], pad_token_id: int, family: str) -> dict[str, Any]:
    """The ``OpenCLIPTextEncoder`` config of a diffusers text encoder.

    diffusers stores SD 2.x's text encoder without its last block (SD 2.x reads the penultimate block's
    output), so an ``sd2`` tower is one block taller than the file and runs ``layer="penultimate"``:
    the same config an SD 2.x single file gives, and the block count its layout implies. Full-size
    SD 1.x / 2.x towers get their named presets (ViT-L-14 / ViT-H-14), as single files do.
    """
    text_cfg, quick_gelu = open_clip_text_cfg(hf_config)
    layer = "last"
    if family == "sd2":
        text_cfg["layers"] += 1
        layer = "penultimate"
    if family in ("sd1", "sd2"):
        conventions = FAMILIES[family]
        named = open_clip.get_model_config(conventions["text_model"])["text_cfg"]
        if all(text_cfg[k] == v for k, v in named.items()) and text_cfg["mlp_ratio"] == 4:
            return dict(model_name=conventions["text_model"], **conventions["text"])
    return dict(model_name=None, text_cfg=text_cfg, quick_gelu=quick_gelu, layer=layer, pad_token_id=pad_token_id)


def _schedule_spec(scheduler: dict[str, Any]) -> dict[str, Any]:
    """A diffusers scheduler config as our ``ScheduleSpec`` dict (diffusers' cosine has fixed constants)."""
    kind = _SCHEDULE_KINDS[scheduler.get("beta_schedule", "scaled_linear")]
    betas = (
        {}
        if kind == "cosine"
        else dict(
            beta_start=float(scheduler.get("beta_start", 0.00085)), beta_end=float(scheduler.get("beta_end", 0.012))
        )
    )
    return ScheduleSpec(
        kind,
        int(scheduler.get("num_train_timesteps", 1000)),
        **betas,
        zero_terminal_snr=bool(scheduler.get("rescale_betas_zero_snr", False)),
    ).to_dict()


def _pad_token_id(tokenizer_dir: Path) -> int:
    """SD 1.x tokenizers pad with <|endoftext|> (49407), SD 2.x's with "!" (0).

    transformers 4.x wrote the pad token to ``special_tokens_map.json`` (published SD folders), 5.x
    writes it to ``tokenizer_config.json`` only; a folder with neither pads as SD 1.x does.
    """
    pad: Any = EOT
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            found = json.loads((tokenizer_dir / name).read_text()).get("pad_token")
            if found is not None:
                pad = found
                break
    pad = pad.get("content", EOT) if isinstance(pad, dict) else pad
    return 49407 if pad == EOT else open_clip.tokenizer.SimpleTokenizer().encoder.get(pad, 0)


def export_diffusers(bundle: ModelBundle, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``bundle`` as a diffusers Stable Diffusion folder (safetensors weights), atomically: the
    folder appears whole, replacing an export already at ``path``, or not at all."""
    root = Path(path)
    if root.exists() and any(root.iterdir()) and not is_diffusers_folder(root):
        raise UserError(f"refusing to write a diffusers folder into non-empty {root}")
    if bundle.unet_config.get("context_pooling"):
        raise UserError(
            "this U-Net pools its text context into the time embedding (context_pooling), which "
            "diffusers' UNet2DConditionModel has no weights for: export it with --to sd instead"
        )
    if bundle.unet_config.get("self_conditioning"):
        raise UserError(
            "this U-Net reads its own previous x0 estimate (self_conditioning), which diffusers' "
            "pipelines never pass: export it with --to sd instead"
        )
    if (patch_size := int(bundle.unet_config.get("patch_size", 1))) != 1:
        raise UserError(
            f"this U-Net works on {patch_size}x{patch_size} latent patches (patch_size), which "
            "diffusers' UNet2DConditionModel cannot: export it with --to sd instead"
        )
    if float(bundle.schedule.get("snr_shift", 1.0)) != 1.0:
        raise UserError(
            f"this model was trained with schedule.snr_shift={bundle.schedule['snr_shift']}, which "
            "diffusers' schedulers cannot express: export it with --to sd instead"
        )

    with atomic.atomic_directory(root) as staging:  # a killed export leaves no half-written folder
        _write_folder(bundle, staging, dtype)
    return root


def _write_folder(bundle: ModelBundle, root: Path, dtype: torch.dtype | None) -> None:
    def save(folder: str, name: str, state: dict[str, Tensor], config: dict[str, Any], config_name: str) -> None:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_safetensors(state, root / folder / name)
        _write_json(root / folder / config_name, config)

    save(
        "unet",
        "diffusion_pytorch_model.safetensors",
        unet_to_diffusers(bundle.unet, bundle.unet_config),
        unet_diffusers_config(bundle.unet_config, bundle.image_size // _downsampling(bundle)),
        "config.json",
    )
    vae_config = dict(vae_diffusers_config(bundle.vae_config), sample_size=bundle.image_size)
    save(
        "vae",
        "diffusion_pytorch_model.safetensors",
        vae_to_diffusers(bundle.vae, bundle.vae_config),
        vae_config,
        "config.json",
    )
    num_layers = text_layers_used(bundle)
    text = {f"text_model.{k}": v for k, v in open_clip_to_hf(bundle.text, num_layers).items()}
    save("text_encoder", "model.safetensors", text, _text_encoder_config(bundle, num_layers, dtype), "config.json")
    _write_tokenizer(root / "tokenizer", bundle)
    _write_json(root / "scheduler" / "scheduler_config.json", _scheduler_config(bundle))
    _write_json(root / "model_index.json", _model_index())


def _downsampling(bundle: ModelBundle) -> int:
    return 2 ** (len(bundle.vae_config.get("channel_multipliers", (1, 2, 4, 4))) - 1)


def text_layers_used(bundle: ModelBundle) -> int:
    """Blocks the text encoder runs: diffusers keeps only those (23 of ViT-H's 24 for SD 2.x).

    Counted on the tower the config builds, not on the tensors: an SD 2.x model read from a
    diffusers folder holds 23 blocks of its 24-block tower.
    """
    total = _tower_blocks(bundle.text_config)
    layer = bundle.text_config.get("layer", "last")
    used = total - 1 if layer == "penultimate" else total if layer == "last" else int(layer)
    if count_blocks(bundle.text) < used:
        raise UserError(f"the text encoder runs {used} blocks but its weights hold {count_blocks(bundle.text)}")
    return used


def _tower_blocks(text_config: dict[str, Any]) -> int:
    """Blocks of the tower ``OpenCLIPTextEncoder(**text_config)`` builds (its explicit or named config)."""
    text_cfg = text_config.get("text_cfg") or open_clip.get_model_config(text_config["model_name"])["text_cfg"]
    return int(text_cfg["layers"])


def _text_encoder_config(bundle: ModelBundle, num_layers: int, dtype: torch.dtype | None) -> dict[str, Any]:
    heads = (bundle.text_config.get("text_cfg") or {}).get("heads") or _named_heads(bundle.text_config)
    config = hf_text_config(bundle.text, heads, bool(bundle.text_config.get("quick_gelu")), num_layers)
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "torch_dtype": str(dtype or torch.float32).removeprefix("torch."),
        "pad_token_id": bundle.text_config.get("pad_token_id", 0),
        **config,
    }


def _named_heads(text_config: dict[str, Any]) -> int:
    config = open_clip.get_model_config(text_config["model_name"])
    return config["text_cfg"]["heads"]


def _write_tokenizer(folder: Path, bundle: ModelBundle) -> None:
    """CLIP's BPE vocabulary, from the copy that ships with open_clip, in the HF file format."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": SOT, "<end_of_text>": EOT}
    vocab = {names.get(token, token): index for token, index in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    pad = (
        EOT
        if bundle.text_config.get("pad_token_id", 0) == 49407
        else tokenizer.decoder[bundle.text_config.get("pad_token_id", 0)]
    )
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": pad}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "do_lower_case": True,
            "clean_up_tokenization_spaces": True,
            "errors": "replace",
            **specials,
        },
    )


def _scheduler_config(bundle: ModelBundle) -> dict[str, Any]:
    spec = ScheduleSpec.from_dict(bundle.schedule)
    zero_snr = spec.zero_terminal_snr
    if spec.kind == "cosine" and (spec.offset, spec.max_beta) != (0.008, 0.999):
        raise UserError(
            f"diffusers' cosine schedule has offset 0.008 and max_beta 0.999, this model's "
            f"{spec.offset} and {spec.max_beta}: export it with --to sd instead"
        )
    betas = (
        dict(beta_start=0.00085, beta_end=0.012)
        if spec.kind == "cosine"
        else dict(beta_start=spec.beta_start, beta_end=spec.beta_end)
    )
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **betas,  # (unused by diffusers' cosine, but its config requires them)
        "beta_schedule": {v: k for k, v in _SCHEDULE_KINDS.items()}[spec.kind],
        "num_train_timesteps": spec.num_timesteps,
        "prediction_type": {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[bundle.prediction_type],
        "rescale_betas_zero_snr": zero_snr,
        "timestep_spacing": "trailing" if zero_snr else "leading",
        "steps_offset": 1,  # used by "leading" spacing only; diffusers warns about any other value
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def _model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
