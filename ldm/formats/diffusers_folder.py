"""The diffusers folder layout of a Stable Diffusion pipeline.

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}      UNet2DConditionModel
    vae/{config.json, diffusion_pytorch_model.safetensors}       AutoencoderKL
    text_encoder/{config.json, model.safetensors}                transformers CLIPTextModel
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    scheduler/scheduler_config.json

Weights are renamed by ``ldm.models.diffusers_layout`` and ``ldm.models.clip_layouts``; configs are
written so that ``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` loads the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor

from ldm.checkpoints import load_state_dict_file, save_safetensors
from ldm.errors import UserError
from ldm.formats.bundle import ModelBundle
from ldm.models.clip_layouts import count_blocks, hf_to_open_clip, hf_text_config, open_clip_to_hf, open_clip_text_cfg
from ldm.models.diffusers_layout import (
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
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


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
    unet_config = unet_config_from_diffusers(_read_json(root / "unet" / "config.json"))
    vae_cfg = _read_json(root / "vae" / "config.json")
    vae_config = vae_config_from_diffusers(vae_cfg)
    hf_config = _read_json(root / "text_encoder" / "config.json")
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
    text_state = _read_weights(root / "text_encoder")
    text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    text_cfg, quick_gelu = open_clip_text_cfg(hf_config)
    pad = _pad_token_id(root / "tokenizer")
    return ModelBundle(
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=dict(model_name=None, text_cfg=text_cfg, quick_gelu=quick_gelu, layer="last", pad_token_id=pad),
        unet=unet_from_diffusers(_read_weights(root / "unet"), unet_config),
        vae=vae_from_diffusers(_read_weights(root / "vae"), vae_config),
        text=hf_to_open_clip(text_state),
        family="custom",
        prediction_type={"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[scheduler.get("prediction_type", "epsilon")],
        image_size=int(vae_cfg.get("sample_size", 512)),
        schedule=_schedule_spec(scheduler),
    )


def _schedule_spec(scheduler: dict[str, Any]) -> dict[str, Any]:
    kind = _SCHEDULE_KINDS[scheduler.get("beta_schedule", "scaled_linear")]
    spec: dict[str, Any] = dict(kind=kind, num_timesteps=int(scheduler.get("num_train_timesteps", 1000)))
    if kind != "cosine":
        spec.update(beta_start=float(scheduler.get("beta_start", 0.00085)), beta_end=float(scheduler.get("beta_end", 0.012)))
    spec["zero_terminal_snr"] = bool(scheduler.get("rescale_betas_zero_snr", False))
    return spec


def _pad_token_id(tokenizer_dir: Path) -> int:
    """SD 1.x tokenizers pad with <|endoftext|> (49407), SD 2.x's with "!" (0)."""
    special = tokenizer_dir / "special_tokens_map.json"
    if not special.is_file():
        return 49407
    pad = json.loads(special.read_text()).get("pad_token", EOT)
    pad = pad.get("content", EOT) if isinstance(pad, dict) else pad
    return 49407 if pad == EOT else open_clip.tokenizer.SimpleTokenizer().encoder.get(pad, 0)


def export_diffusers(bundle: ModelBundle, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``bundle`` as a diffusers Stable Diffusion folder (safetensors weights)."""
    root = Path(path)
    if root.exists() and any(root.iterdir()) and not is_diffusers_folder(root):
        raise UserError(f"refusing to write a diffusers folder into non-empty {root}")
    if bundle.unet_config.get("context_pooling"):
        raise UserError("this U-Net pools its text context into the time embedding (context_pooling), which "
                        "diffusers' UNet2DConditionModel has no weights for: export it with --to sd instead")  # fmt: skip
    if bundle.unet_config.get("self_conditioning"):
        raise UserError("this U-Net reads its own previous x0 estimate (self_conditioning), which diffusers' "
                        "pipelines never pass: export it with --to sd instead")  # fmt: skip
    if (patch_size := int(bundle.unet_config.get("patch_size", 1))) != 1:
        raise UserError(f"this U-Net works on {patch_size}x{patch_size} latent patches (patch_size), which "
                        "diffusers' UNet2DConditionModel cannot: export it with --to sd instead")  # fmt: skip
    if float(bundle.schedule.get("snr_shift", 1.0)) != 1.0:
        raise UserError(f"this model was trained with schedule.snr_shift={bundle.schedule['snr_shift']}, which "
                        "diffusers' schedulers cannot express: export it with --to sd instead")  # fmt: skip

    def save(folder: str, name: str, state: dict[str, Tensor], config: dict[str, Any], config_name: str) -> None:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_safetensors(state, root / folder / name)
        _write_json(root / folder / config_name, config)

    save("unet", "diffusion_pytorch_model.safetensors", unet_to_diffusers(bundle.unet, bundle.unet_config),
         unet_diffusers_config(bundle.unet_config, bundle.image_size // _downsampling(bundle)), "config.json")  # fmt: skip
    vae_config = dict(vae_diffusers_config(bundle.vae_config), sample_size=bundle.image_size)
    save("vae", "diffusion_pytorch_model.safetensors", vae_to_diffusers(bundle.vae, bundle.vae_config), vae_config, "config.json")
    num_layers = _text_layers_used(bundle)
    text = {f"text_model.{k}": v for k, v in open_clip_to_hf(bundle.text, num_layers).items()}
    save("text_encoder", "model.safetensors", text, _text_encoder_config(bundle, num_layers, dtype), "config.json")
    _write_tokenizer(root / "tokenizer", bundle)
    _write_json(root / "scheduler" / "scheduler_config.json", _scheduler_config(bundle))
    _write_json(root / "model_index.json", _model_index())
    return root


def _downsampling(bundle: ModelBundle) -> int:
    return 2 ** (len(bundle.vae_config.get("channel_multipliers", (1, 2, 4, 4))) - 1)


def _text_layers_used(bundle: ModelBundle) -> int:
    """Blocks the text encoder runs: diffusers keeps only those (23 of ViT-H's 24 for SD 2.x)."""
    total = count_blocks(bundle.text)
    layer = bundle.text_config.get("layer", "last")
    if layer == "penultimate":
        return total - 1
    return total if layer == "last" else int(layer)


def _text_encoder_config(bundle: ModelBundle, num_layers: int, dtype: torch.dtype | None) -> dict[str, Any]:
    heads = bundle.text_config.get("text_cfg", {}).get("heads") or _named_heads(bundle.text_config)
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
    pad = EOT if bundle.text_config.get("pad_token_id", 0) == 49407 else tokenizer.decoder[bundle.text_config.get("pad_token_id", 0)]
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": pad}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "clean_up_tokenization_spaces": True, "errors": "replace", **specials,
    })  # fmt: skip


def _scheduler_config(bundle: ModelBundle) -> dict[str, Any]:
    zero_snr = bool(bundle.schedule.get("zero_terminal_snr", False))
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": bundle.schedule.get("beta_start", 0.00085),
        "beta_end": bundle.schedule.get("beta_end", 0.012),
        "beta_schedule": {v: k for k, v in _SCHEDULE_KINDS.items()}[bundle.schedule.get("kind", "scaled_linear")],
        "num_train_timesteps": bundle.schedule["num_timesteps"],
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
