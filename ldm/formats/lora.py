"""LoRA files: kohya (A1111, ComfyUI) and diffusers/PEFT layouts, read and written; merging into a model.

Every file is read into ``LoRAWeights`` (``ldm.models.lora``): factors keyed by this project's names
(U-Net module paths of the SD single-file layout; text-tower targets ``transformer.resblocks.{i}.attn.q``
...), checked against the model they are applied to. Formats:

kohya (sd-scripts ``networks/lora.py``; what A1111, ComfyUI and most published LoRAs use)
    ``lora_unet_{module}.lora_down.weight`` (r, in[, k, k]), ``.lora_up.weight`` (out, r[, 1, 1]),
    ``.alpha`` (a 0-d tensor; absent: alpha = r), where {module} is the U-Net module path with dots
    replaced by underscores. sd-scripts trains SD 1.x / 2.x on the diffusers U-Net, so its names are
    diffusers' (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); files
    named after the original layout (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``,
    which ComfyUI also reads) are read too. Text encoder: ``lora_te_text_model_encoder_layers_{i}_
    self_attn_{q,k,v,out}_proj`` and ``..._mlp_fc{1,2}`` (the Hugging Face CLIP names). Metadata:
    kohya's ``ss_*`` keys (base model, network_dim, network_alpha, resolution, steps, ...) and the
    ``modelspec.*`` keys of Stability's model spec, all strings.
diffusers / PEFT (``StableDiffusionPipeline.load_lora_weights``)
    ``unet.{diffusers module}.lora_A.weight`` / ``.lora_B.weight`` and
    ``text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj.lora_A.weight`` ...; no alpha in the
    keys: diffusers reads it from the ``lora_adapter_metadata`` JSON (``unet.lora_alpha``, ...) when a
    file has one, else scale 1. Read also: the diffusers spellings ``.lora.down/.up``,
    ``.lora_linear_layer.down/.up`` and ``.processor.to_q_lora.down`` of older files. Written: PEFT
    keys with alpha / r folded into ``lora_B``, so every reader (ComfyUI too) applies the same update.

Files from outside are hostile: safetensors (or torch files read with ``weights_only=True``), at most
``MAX_FILE_BYTES`` and ``MAX_TENSORS``; names, shapes and dtypes are checked against the model from the
header before any tensor is read; unknown keys, shapes that do not fit and non-finite values are
refused in one line naming them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.checkpoints import save_safetensors
from ldm.errors import UserError
from ldm.formats.bundle import ModelBundle
from ldm.formats.diffusers_folder import text_layers_used
from ldm.formats.diffusers_layout import unet_module_map
from ldm.models.lora import (
    MAX_RANK,
    LoRAFactors,
    LoRASettingsError,
    LoRASpec,
    LoRAWeights,
    adaptable_layers,
    float32,
    merge_text,
    merge_unet,
    target_features,
    text_lora_targets,
)
from ldm.models.unet import UNetModel

MAX_FILE_BYTES = 4 << 30  # a full-rank SD 1.x LoRA in fp32 is ~3.4 GB; published ones are 10-300 MB
MAX_TENSORS = 20_000  # kohya's LoCon on every SD 1.x layer plus the text encoder has ~2,300
MAX_METADATA_BYTES = 1 << 20  # kohya's ss_tag_frequency can be large, never this large
FORMATS = ("kohya", "diffusers")
KOHYA_UNET, KOHYA_TEXT = "lora_unet_", "lora_te_"
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_PARTS = {  # key suffix -> factor; the module path is what precedes it
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}
# attention processors of diffusers < 0.21: attn1.processor.to_q_lora.down.weight -> attn1.to_q
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_OURS = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(attn\.q|attn\.k|attn\.v|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$"
)
_TEXT_HF = re.compile(
    r"^encoder\.layers\.(\d+)\.(self_attn\.q_proj|self_attn\.k_proj|self_attn\.v_proj|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)$"
)
_TEXT_TO_HF = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TEXT_FROM_HF = {v: k for k, v in _TEXT_TO_HF.items()}


# ---------------------------------------------------------------------- names
def text_target_to_hf(name: str) -> str:
    """``transformer.resblocks.3.attn.q`` -> ``encoder.layers.3.self_attn.q_proj`` (relative to ``text_model.``)."""
    match = _TEXT_OURS.match(name)
    if match is None:
        raise KeyError(name)
    return f"encoder.layers.{match.group(1)}.{_TEXT_TO_HF[match.group(2)]}"


def text_target_from_hf(name: str) -> str | None:
    """The inverse of ``text_target_to_hf`` (``text_model.`` already removed); None for other modules."""
    match = _TEXT_HF.match(name)
    return None if match is None else f"transformer.resblocks.{match.group(1)}.{_TEXT_FROM_HF[match.group(2)]}"


@dataclass(frozen=True)
class UNetNames:
    """The adaptable layers of one U-Net config: our path -> weight shape, and -> diffusers module path
    (empty when diffusers' ``UNet2DConditionModel`` cannot hold this U-Net: patches, self-conditioning,
    context pooling, a first level wider than ``model_channels``)."""

    shapes: dict[str, tuple[int, ...]]
    diffusers: dict[str, str]

    @classmethod
    def of(cls, unet_config: Mapping[str, Any]) -> UNetNames:
        return _unet_names(json.dumps(unet_config, sort_keys=True, default=list))

    @classmethod
    def build(cls, unet_config: Mapping[str, Any]) -> UNetNames:
        with torch.device("meta"):
            layers = adaptable_layers(UNetModel(**unet_config))
        shapes = {path: tuple(layer.weight.shape) for path, layer in layers.items()}
        diffusers: dict[str, str] = {}
        plain = (
            not any(unet_config.get(k) for k in ("context_pooling", "self_conditioning"))
            and int(unet_config.get("patch_size", 1)) == 1
        )
        if plain:
            try:
                renamed = unet_module_map(unet_config).apply({f"{p}.weight": layers[p].weight for p in layers})
                diffusers = {path: key.removesuffix(".weight") for path, key in zip(layers, renamed)}
            except (ValueError, KeyError):
                diffusers = {}
        return cls(shapes, diffusers)

    def kohya_names(self) -> dict[str, str]:
        """Underscored module path (no ``lora_unet_``) -> our path: diffusers' names and ours (the original layout)."""
        names = {path.replace(".", "_"): path for path in self.shapes}
        names.update({theirs.replace(".", "_"): ours for ours, theirs in self.diffusers.items()})
        return names


@functools.lru_cache(maxsize=8)
def _unet_names(config_json: str) -> UNetNames:
    """``UNetNames.build`` once per U-Net config (it builds the U-Net on the meta device)."""
    return UNetNames.build(json.loads(config_json))


# ---------------------------------------------------------------------- reading files
def read_lora(path: str | Path, bundle: ModelBundle, use_ema: bool = True) -> LoRAWeights:
    """The LoRA in ``path`` (kohya or diffusers safetensors, a torch file of either, or one of our LoRA
    training checkpoints: its EMA adapters unless ``use_ema=False``), checked against ``bundle``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(
            f"{path}: {size / 2**30:.1f} GiB is more than a LoRA file may be ({MAX_FILE_BYTES / 2**30:.0f} GiB)"
        )
    if path.suffix == ".safetensors":
        header, metadata = _safetensors_header(path)
        parsed = parse_lora_keys(header, metadata, bundle, path)
        tensors = _read_safetensors(path, parsed.keys())
    else:
        state = _read_torch_file(path)
        if isinstance(state, dict) and "ldm" in state and "state_dict" in state:  # a training checkpoint of ours
            return checked_weights(lora_from_checkpoint(state, use_ema, path), bundle, path)
        header = {k: (tuple(v.shape), v.dtype if v.is_floating_point() else None) for k, v in state.items()}
        parsed = parse_lora_keys(header, {}, bundle, path)
        tensors = {k: state[k] for k in parsed.keys()}
    return fitted(parsed.weights(tensors, path), bundle)


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, str]]:
    """(key -> (shape, dtype), metadata) from the header alone: no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                raise UserError(f"{path}: {len(keys)} tensors, more than a LoRA file may hold ({MAX_TENSORS})")
            header = {}
            for key in keys:
                piece = f.get_slice(key)
                header[key] = (tuple(piece.get_shape()), _DTYPES.get(piece.get_dtype()))
    except UserError:
        raise
    except Exception as error:  # not a safetensors file, a corrupt header
        raise UserError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {str(error)[:120]})"
        ) from error
    if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_BYTES:
        raise UserError(f"{path}: its metadata is larger than {MAX_METADATA_BYTES >> 20} MiB")
    return header, metadata


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _read_safetensors(path: Path, keys: Sequence[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in keys}


def _read_torch_file(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled code, corrupt file: refused either way
        raise UserError(
            f"{path} is not a loadable weights file ({type(error).__name__}); LoRA files are "
            f".safetensors or torch files of tensors only"
        ) from error
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a mapping of tensors")
    if "ldm" in state and "state_dict" in state:
        return state
    if len(state) > MAX_TENSORS:
        raise UserError(f"{path}: {len(state)} entries, more than a LoRA file may hold ({MAX_TENSORS})")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise UserError(f"{path}: entries that are not tensors ({', '.join(map(str, bad[:3]))})")
    return state


@dataclass
class _Factor:
    """Where one adapted weight's factors are in a file: its keys, and alpha if given otherwise."""

    network: str  # "unet" | "text"
    target: str  # our name
    down: str | None = None
    up: str | None = None
    alpha_key: str | None = None
    alpha: float | None = None  # from a diffusers file's adapter metadata (None: alpha = rank)
    rslora: bool = False  # PEFT's rank-stabilised scale alpha / sqrt(r)


@dataclass
class ParsedLoRA:
    """The plan of a LoRA file: which keys hold which factors of which of our targets."""

    format: str
    factors: list[_Factor]
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        return [k for f in self.factors for k in (f.down, f.up, f.alpha_key) if k is not None]

    def weights(self, tensors: Mapping[str, Tensor], path: Path) -> LoRAWeights:
        """The factors, reshaped to our adapters' shapes, checked finite."""
        result = LoRAWeights(metadata={**self.metadata, "format": self.format})
        for factor in self.factors:
            down, up = tensors[factor.down], tensors[factor.up]
            rank = down.shape[0]
            if factor.alpha_key is not None:
                alpha = float(tensors[factor.alpha_key].float().reshape(-1)[0])
            else:
                alpha = factor.alpha if factor.alpha is not None else float(rank)
            if factor.rslora:  # scale alpha / sqrt(r) = (alpha sqrt(r)) / r
                alpha *= math.sqrt(rank)
            if not (math.isfinite(alpha) and torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise UserError(f"{path}: the factors of {factor.target} hold non-finite values (NaN/Inf)")
            if alpha == 0:
                alpha = float(rank)  # kohya: alpha 0 means alpha = rank
            entry = LoRAFactors(down, up, float32(alpha))
            (result.unet if factor.network == "unet" else result.text)[factor.target] = entry
        return result


def parse_lora_keys(
    header: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]],
    metadata: Mapping[str, str],
    bundle: ModelBundle,
    path: str | Path,
) -> ParsedLoRA:
    """Map the keys of a LoRA file onto ``bundle``'s layers (from names, shapes and dtypes alone)."""
    if not header:
        raise UserError(f"{path} holds no tensors")
    keys = list(header)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        raise UserError(f"{path} is an SDXL LoRA (lora_te1_/lora_te2_ keys); only SD 1.x / 2.x LoRAs are supported")
    if any(k.startswith((KOHYA_UNET, KOHYA_TEXT)) for k in keys):
        parsed = _parse_kohya(keys, bundle, path, metadata)
    else:
        parsed = _parse_diffusers(keys, bundle, path, metadata)
    _check_shapes(parsed, header, bundle, path)
    return parsed


def _unknown(path: str | Path, unknown: list[str], what: str) -> UserError:
    shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
    return UserError(f"{path}: {len(unknown)} key(s) {what}: {shown}")


def _parse_kohya(keys: list[str], bundle: ModelBundle, path: str | Path, metadata: Mapping[str, str]) -> ParsedLoRA:
    unet_names = UNetNames.of(bundle.unet_config).kohya_names()
    factors: dict[str, _Factor] = {}
    unknown = []
    for key in keys:
        name, _, part = key.partition(".")
        if part not in _KOHYA_PARTS:
            unknown.append(key)
            continue
        if name.startswith(KOHYA_UNET):
            network, target = "unet", unet_names.get(name[len(KOHYA_UNET) :])
        elif name.startswith(KOHYA_TEXT):
            hf = name[len(KOHYA_TEXT) :].removeprefix("text_model_")
            network, target = "text", _kohya_text_target(hf)
        else:
            network, target = "", None
        if target is None:
            unknown.append(key)
            continue
        factor = factors.setdefault(name, _Factor(network, target))
        setattr(factor, {"down": "down", "up": "up", "alpha": "alpha_key"}[_KOHYA_PARTS[part]], key)
    if unknown:
        raise _unknown(
            path,
            unknown,
            "that name no layer of this model or no LoRA factor (LyCORIS LoHa/LoKr, DoRA "
            "and other adapters are not LoRA)",
        )
    return ParsedLoRA("kohya", _complete(factors.values(), path), dict(metadata))


def _kohya_text_target(underscored: str) -> str | None:
    """``encoder_layers_3_self_attn_q_proj`` -> our text target (underscores are ambiguous: match the pattern)."""
    match = re.fullmatch(
        r"encoder_layers_(\d+)_(self_attn_q_proj|self_attn_k_proj|self_attn_v_proj|self_attn_out_proj|mlp_fc1|mlp_fc2)",
        underscored,
    )
    if match is None:
        return None
    hf = match.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return text_target_from_hf(f"encoder.layers.{match.group(1)}.{hf}")


def _parse_diffusers(keys: list[str], bundle: ModelBundle, path: str | Path, metadata: Mapping[str, str]) -> ParsedLoRA:
    names = UNetNames.of(bundle.unet_config)
    unet_from_diffusers = {theirs: ours for ours, theirs in names.diffusers.items()}
    adapter_metadata = _adapter_metadata(metadata, path)
    factors: dict[tuple[str, str], _Factor] = {}
    unknown = []
    for key in keys:
        network, module, part = _diffusers_key(key)
        target = None
        if network == "unet":
            target = unet_from_diffusers.get(module)
        elif network == "text":
            target = text_target_from_hf(module.removeprefix("text_model."))
        if target is None or part is None:
            unknown.append(key)
            continue
        factor = factors.setdefault((network, target), _Factor(network, target))
        setattr(factor, part, key)
        prefix = "unet" if network == "unet" else "text_encoder"
        factor.alpha = _peft_alpha(adapter_metadata, prefix, module)
        factor.rslora = bool(adapter_metadata.get(f"{prefix}.use_rslora"))
    if unknown:
        hint = "" if names.diffusers else " (this U-Net has no diffusers layout)"
        raise _unknown(path, unknown, f"that are neither kohya nor diffusers/PEFT LoRA keys of this model{hint}")
    return ParsedLoRA("diffusers", _complete(factors.values(), path), dict(metadata))


def _diffusers_key(key: str) -> tuple[str, str, str | None]:
    """(network, module path, "down"|"up"|None) of a diffusers/PEFT key (network "" when unknown)."""
    network, rest = "", key
    for prefix, name in (("unet.", "unet"), ("text_encoder.", "text")):
        if key.startswith(prefix):
            network, rest = name, key[len(prefix) :]
    if not network and key.startswith(
        ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
    ):
        network = "unet"  # PEFT's own save of a bare U-Net
    processor = _PROCESSOR.match(rest)
    if processor is not None:
        module = f"{processor.group(1)}.{processor.group(2)}" + (".0" if processor.group(2) == "to_out" else "")
        return network, module, processor.group(3)
    for suffix, part in _DIFFUSERS_PARTS.items():
        if rest.endswith(suffix):
            return network, rest[: -len(suffix)], part
    return network, rest, None


def _adapter_metadata(metadata: Mapping[str, str], path: str | Path) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: the LoraConfig of each part, under ``unet.`` / ``text_encoder.``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise UserError(f"{path}: its lora_adapter_metadata is not JSON ({error})") from error
    return value if isinstance(value, dict) else {}


def _peft_alpha(config: Mapping[str, Any], prefix: str, module: str) -> float | None:
    """The alpha PEFT would use for ``module``: the first ``alpha_pattern`` entry matching it (PEFT's
    rule: the pattern matches the module name's tail), else ``lora_alpha``; None when the file has
    no adapter metadata (diffusers then uses alpha = r)."""
    if f"{prefix}.lora_alpha" not in config:
        return None
    alpha = config[f"{prefix}.lora_alpha"]
    patterns = config.get(f"{prefix}.alpha_pattern") or {}
    for pattern, value in patterns.items() if isinstance(patterns, dict) else ():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        except re.error as error:
            raise UserError(
                f"lora_adapter_metadata: alpha_pattern {str(pattern)[:60]!r} is not a pattern ({error})"
            ) from None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise UserError(f"lora_adapter_metadata: {prefix}.lora_alpha is not a number ({alpha!r})")
    return float(alpha)


def _complete(factors: Sequence[_Factor], path: str | Path) -> list[_Factor]:
    missing = [f"{f.target} ({'down' if f.down is None else 'up'})" for f in factors if f.down is None or f.up is None]
    if missing:
        raise UserError(f"{path}: LoRA factors without their other half: {', '.join(missing[:3])}")
    return list(factors)


def _check_shapes(
    parsed: ParsedLoRA, header: Mapping[str, tuple[tuple[int, ...], Any]], bundle: ModelBundle, path: str | Path
) -> None:
    """Every factor pair must fit its layer: down (r, in[, k, k]), up (out, r[, 1, 1]), r <= MAX_RANK."""

    unet_shapes = UNetNames.of(bundle.unet_config).shapes
    text_shapes = _text_shapes(bundle)
    for factor in parsed.factors:
        weight = (unet_shapes if factor.network == "unet" else text_shapes).get(factor.target)
        (down, down_dtype), (up, up_dtype) = header[factor.down], header[factor.up]
        where = f"{path}: {factor.down}"
        if down_dtype is None or up_dtype is None or (factor.alpha_key and header[factor.alpha_key][1] is None):
            raise UserError(f"{where}: LoRA factors must be floating-point tensors")
        if weight is None:
            raise UserError(f"{where}: this model has no such layer")
        if factor.alpha_key is not None and math.prod(header[factor.alpha_key][0]) != 1:
            raise UserError(f"{where}: alpha must be one number, got shape {header[factor.alpha_key][0]}")
        if not factors_fit(tuple(down), tuple(up), tuple(weight)):
            raise UserError(
                f"{where}: LoRA factors down {tuple(down)}, up {tuple(up)} do not fit its weight "
                f"{tuple(weight)} (rank at most {MAX_RANK})"
            )


def factors_fit(down: tuple[int, ...], up: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Whether down (r, in[, k, k]) and up (out, r[, 1, 1]) make an update of ``weight``'s shape; a
    Linear or 1x1-conv weight takes 2-d and 4-d factors alike (tools differ), a k x k conv needs k x k."""

    if len(down) < 2 or not 1 <= down[0] <= MAX_RANK:
        return False
    rank = down[0]
    pointwise = math.prod(weight[2:]) == 1
    down_ok = down[1:] == weight[1:] or (pointwise and down[1:] in ((weight[1],), (weight[1], 1, 1)))
    return down_ok and up in ((weight[0], rank), (weight[0], rank, 1, 1))


def _text_shapes(bundle: ModelBundle) -> dict[str, tuple[int, int]]:
    try:
        targets = text_lora_targets(bundle.text, text_layers_used(bundle))
    except (KeyError, UserError):
        return {}
    return {name: target_features(t)[::-1] for name, t in targets.items()}


def checked_weights(weights: LoRAWeights, bundle: ModelBundle, path: str | Path) -> LoRAWeights:
    """``weights`` (already in our names, e.g. from a checkpoint) checked against ``bundle``'s layers."""
    unet_shapes = UNetNames.of(bundle.unet_config).shapes
    text_shapes = _text_shapes(bundle)
    for network, factors, shapes in (("U-Net", weights.unet, unet_shapes), ("text encoder", weights.text, text_shapes)):
        for name, f in factors.items():
            weight = shapes.get(name)
            if weight is None or not factors_fit(tuple(f.down.shape), tuple(f.up.shape), tuple(weight)):
                raise UserError(
                    f"{path}: its {network} adapter {name} does not fit this model (down {tuple(f.down.shape)}, "
                    f"up {tuple(f.up.shape)} for {'no such layer' if weight is None else weight})"
                )
    return fitted(weights, bundle)


def _reshaped(f: LoRAFactors, weight_shape: Sequence[int]) -> LoRAFactors:
    """Factors in our adapters' shapes: 2-d for a Linear weight, 4-d for a convolution's."""
    rank = f.rank
    if len(weight_shape) == 2:
        return LoRAFactors(f.down.reshape(rank, -1), f.up.reshape(f.up.shape[0], rank), f.alpha)
    kernel = tuple(weight_shape[2:])
    return LoRAFactors(f.down.reshape(rank, weight_shape[1], *kernel), f.up.reshape(f.up.shape[0], rank, 1, 1), f.alpha)


def fitted(weights: LoRAWeights, bundle: ModelBundle) -> LoRAWeights:
    """``weights`` with every factor in the shape of the adapter of its layer (a kohya 4-d factor of a
    Linear layer becomes 2-d, ...): what ``LoRANetwork.from_weights`` loads."""
    unet_shapes = UNetNames.of(bundle.unet_config).shapes
    return dataclasses.replace(
        weights,
        unet={p: _reshaped(f, unet_shapes[p]) for p, f in weights.unet.items()},
        text={n: _reshaped(f, (f.up.shape[0], math.prod(f.down.shape[1:]))) for n, f in weights.text.items()},
    )


# ---------------------------------------------------------------------- our training checkpoints
def lora_spec(config: Any) -> LoRASpec:
    """``LoRASpec.from_config`` (a run's ``task.lora``, a checkpoint's record), bad settings as one line."""
    try:
        return LoRASpec.from_config(config)
    except LoRASettingsError as error:
        raise UserError(str(error)) from None


def lora_from_checkpoint(checkpoint: Mapping[str, Any], use_ema: bool, path: str | Path) -> LoRAWeights:
    """The adapters of a LoRA run's checkpoint (``LatentDiffusion`` with ``task.lora.rank > 0``):
    ``lora.{unet,text}.<name>.{down,up}.weight``, or their EMA copy under ``ema.module.``."""
    record = checkpoint.get("ldm") if isinstance(checkpoint.get("ldm"), dict) else {}
    spec = lora_spec(record.get("lora"))
    if not spec.enabled:
        raise UserError(
            f"{path} is not a LoRA run's checkpoint (it was trained with task.lora.rank=0): use it as "
            f"the model (checkpoint=...), or export the model with --to sd"
        )
    state = checkpoint["state_dict"]
    prefix = "ema.module." if use_ema and any(k.startswith("ema.module.") for k in state) else "lora."
    weights = LoRAWeights(metadata={"format": "ldm", "source": str(path)})
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in state.items():
        for part in ("down", "up"):
            suffix = f".{part}.weight"
            if key.startswith(prefix) and key.endswith(suffix):
                network, _, name = key[len(prefix) : -len(suffix)].partition(".")
                pairs.setdefault((network, name), {})[part] = tensor
    for (network, name), factors in pairs.items():
        if set(factors) != {"down", "up"} or network not in ("unet", "text"):
            raise UserError(f"{path}: its adapter {network}.{name} is incomplete")
        # alpha is the spec's: conv_alpha for k x k convolutions, alpha otherwise (None: = rank)
        kernel_conv = factors["down"].ndim == 4 and tuple(factors["down"].shape[2:]) != (1, 1)
        alpha = spec.conv_alpha if kernel_conv and spec.conv_alpha is not None else spec.alpha
        alpha = float32(factors["down"].shape[0]) if alpha is None else alpha
        entry = LoRAFactors(factors["down"], factors["up"], alpha)
        (weights.unet if network == "unet" else weights.text)[name] = entry
    if not len(weights):
        raise UserError(f"{path}: a LoRA run's checkpoint without adapter weights")
    weights.metadata["lora_spec"] = json.dumps(spec.as_dict())
    return weights


# ---------------------------------------------------------------------- applying
def apply_loras(bundle: ModelBundle, loras: Sequence[tuple[LoRAWeights, float]]) -> ModelBundle:
    """``bundle`` with each LoRA's update, times its scale, added to the weights (float32 where adapted):
    W' = W + sum_i s_i (alpha_i / r_i) up_i @ down_i."""

    unet, text = bundle.unet, bundle.text
    for weights, scale in loras:
        if not math.isfinite(scale):
            raise UserError(f"a LoRA scale must be a finite number, got {scale}")
        unet = merge_unet(unet, weights.unet, scale)
        text = merge_text(text, weights.text, text_layers_used(bundle), scale)
    return dataclasses.replace(bundle, unet=unet, text=text)


def load_and_apply(bundle: ModelBundle, files: Sequence[str], scales: Sequence[float]) -> ModelBundle:
    """``bundle`` with the LoRA ``files`` merged at ``scales`` (one each; 1.0 for all when empty)."""
    scales = list(scales) or [1.0] * len(files)
    if len(scales) != len(files):
        raise UserError(f"{len(files)} LoRA file(s) but {len(scales)} scale(s): give one lora_scale per lora")
    return apply_loras(bundle, [(read_lora(f, bundle), float(s)) for f, s in zip(files, scales)])


# ---------------------------------------------------------------------- writing
def kohya_state(
    weights: LoRAWeights, unet_config: Mapping[str, Any], dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Tensors under kohya names: diffusers module names for SD-shaped U-Nets (as sd-scripts writes
    them), the original layout's otherwise; ``alpha`` as a 0-d tensor of the factors' dtype."""
    names = UNetNames.of(unet_config)
    state: dict[str, Tensor] = {}

    def add(name: str, f: LoRAFactors) -> None:
        cast = dtype or f.down.dtype
        state[f"{name}.lora_down.weight"] = f.down.to(cast)
        state[f"{name}.lora_up.weight"] = f.up.to(cast)
        state[f"{name}.alpha"] = torch.tensor(f.alpha, dtype=torch.float32 if cast == torch.float32 else cast)

    for path, f in weights.unet.items():
        add(KOHYA_UNET + names.diffusers.get(path, path).replace(".", "_"), f)
    for name, f in weights.text.items():
        add(KOHYA_TEXT + ("text_model." + text_target_to_hf(name)).replace(".", "_"), f)
    return state


def diffusers_state(
    weights: LoRAWeights, unet_config: Mapping[str, Any], dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """PEFT keys under ``unet.`` / ``text_encoder.``, alpha / r folded into ``lora_B`` (diffusers assumes
    scale 1 for files without adapter metadata, and so does ComfyUI)."""
    names = UNetNames.of(unet_config)
    if weights.unet and not names.diffusers:
        raise UserError(
            "this U-Net has no diffusers layout (patches, self-conditioning or context pooling): "
            "export its LoRA with --format kohya"
        )
    state: dict[str, Tensor] = {}

    def add(name: str, f: LoRAFactors) -> None:
        cast = dtype or f.down.dtype
        state[f"{name}.lora_A.weight"] = f.down.to(cast)
        state[f"{name}.lora_B.weight"] = (f.up.float() * f.scale).to(cast)

    for path, f in weights.unet.items():
        add("unet." + names.diffusers[path], f)
    for name, f in weights.text.items():
        add("text_encoder.text_model." + text_target_to_hf(name), f)
    return state


def kohya_metadata(weights: LoRAWeights, bundle: ModelBundle, info: Mapping[str, Any]) -> dict[str, str]:
    """kohya's ``ss_*`` keys and Stability's ``modelspec.*`` keys, as A1111/ComfyUI/Civitai show them.

    info: what the exporter knows of the run: base_model (path), base_fingerprint, steps, resolution,
    title, learning_rate, optimizer, seed, ... (missing ones are left out)."""
    factors = [*weights.unet.values(), *weights.text.values()]
    linear = [f for f in factors if f.down.ndim == 2 or f.down.shape[2:] == (1, 1)] or factors
    conv = [f for f in factors if f.down.ndim == 4 and f.down.shape[2:] != (1, 1)]
    rank, alpha = _most_common([f.rank for f in linear]), _most_common([f.alpha for f in linear])
    v2 = bundle.family == "sd2"
    v_prediction = bundle.prediction_type == "v"
    resolution = int(info.get("resolution") or bundle.image_size)
    architecture = {
        "sd1": "stable-diffusion-v1",
        "sd2": "stable-diffusion-v2-768-v" if v_prediction and resolution >= 768 else "stable-diffusion-v2-512",
    }.get(bundle.family, "ldm-custom")
    metadata: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": _number(alpha),
        "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2"}.get(bundle.family, "custom"),
        "ss_v2": v2,
        "ss_v_parameterization": v_prediction,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_text_encoder_lora": bool(weights.text),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.get("title") or "ldm LoRA",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": {"eps": "epsilon", "v": "v"}.get(bundle.prediction_type, bundle.prediction_type),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(info.get("date", time.time()))),
    }
    if conv:
        conv_rank, conv_alpha = _most_common([f.rank for f in conv]), _most_common([f.alpha for f in conv])
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": _number(conv_alpha)})
    optional = {
        "ss_sd_model_name": info.get("base_model") and Path(str(info["base_model"])).name,
        "ss_steps": info.get("steps"),
        "ss_max_train_steps": info.get("max_steps"),
        "ss_learning_rate": info.get("learning_rate"),
        "ss_optimizer": info.get("optimizer"),
        "ss_seed": info.get("seed"),
        "ss_output_name": info.get("title"),
        "ss_training_comment": info.get("comment"),
    }
    metadata.update({k: v for k, v in optional.items() if v is not None})
    return {k: str(v) for k, v in metadata.items()}


def _most_common(values: Sequence[Any]) -> Any:
    return max(set(values), key=values.count) if values else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def export_lora(
    weights: LoRAWeights,
    bundle: ModelBundle,
    path: str | Path,
    format: str = "kohya",
    dtype: torch.dtype | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``weights`` (LoRA of ``bundle``'s model) as a ``.safetensors`` file in ``format`` (atomically).

    Both formats also carry ``ldm_lora``: JSON of the base model (path and fingerprint), rank, alpha and
    the run's steps, for people and for the sampling job's records."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA export writes .safetensors files, got {path.name}")
    if format not in FORMATS:
        raise UserError(f"LoRA format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not len(weights):
        raise UserError("no LoRA adapters to export")
    info = dict(info or {})
    if format == "kohya":
        state = kohya_state(weights, bundle.unet_config, dtype)
        metadata = kohya_metadata(weights, bundle, info)
    else:
        state = diffusers_state(weights, bundle.unet_config, dtype)
        metadata = {"format": "pt"}
    metadata["ldm_lora"] = json.dumps(
        {
            "base_model": info.get("base_model"),
            "base_fingerprint": info.get("base_fingerprint"),
            "family": bundle.family,
            "ranks": weights.ranks(),
            "steps": info.get("steps"),
            "unet_layers": len(weights.unet),
            "text_layers": len(weights.text),
            "format": format,
        }
    )
    save_safetensors(state, path, metadata=metadata)
    return path


def run_info(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a LoRA file's metadata says about the run that trained it (for people; read from the
    checkpoint's records and its config, which nothing builds from)."""
    record = checkpoint.get("ldm") or {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    source = (record.get("frozen_sources") or {}).get("unet") or {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    optim = ((config.get("optim") or {}).get("optimizer") or {}) if isinstance(config.get("optim"), dict) else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    return {
        "base_model": source.get("path") or model.get("pretrained"),
        "base_fingerprint": source.get("fingerprint"),
        "steps": checkpoint.get("global_step"),
        "max_steps": trainer.get("max_steps"),
        "resolution": (config.get("task") or {}).get("image_size") if isinstance(config.get("task"), dict) else None,
        "learning_rate": optim.get("lr"),
        "optimizer": str(optim.get("_target_", "")).rsplit(".", 1)[-1] or None,
        "seed": config.get("seed"),
        "title": config.get("run_name"),
    }
