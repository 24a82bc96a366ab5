"""Low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W (out, in) of a Linear layer, or (out, in, k, k) of a convolution, is adapted by
a rank-r update scaled by alpha / r (Hu et al., Sec. 4.1):

    W' = W + (alpha / r) * up @ down        down: (r, in) or (r, in, k, k), up: (out, r) or (out, r, 1, 1)

``down`` starts from torch's default (Kaiming-uniform) init and ``up`` from zeros, so an untrained
adapter changes nothing. For a k x k convolution ``down`` is a convolution with the base layer's
kernel, stride and padding and ``up`` a 1x1 one (the LoCon form kohya and PEFT use), so the update
is the product of the two filters seen as (out, r) @ (r, in * k * k).

Two ways to run an adapted network, the same function:
- training: the U-Net keeps its own modules and names; a forward hook on each adapted layer adds
  ``up(down(x)) * alpha / r`` to its output (``LoRANetwork.attach``). The text encoder's q, k and v
  share one fused ``in_proj_weight``, so it runs with its weights swapped for W + update instead
  (``AdaptedTextEncoder``, through ``torch.func.functional_call``).
- inference: the updates are added to the weights once (``merge``), several LoRAs at their scales.

What may be adapted (``LoRASpec.targets``, groups of our SD-layout modules):
    attention     to_q, to_k, to_v, to_out.0 of every self- and cross-attention (attn1, attn2)
    transformer   the rest of each spatial transformer: proj_in, proj_out, ff.net.0.proj, ff.net.2
                  (attention + transformer is kohya's default LoRA)
    resblocks     ResBlock in_layers.2 / out_layers.3 (3x3), emb_layers.1, skip_connection, and the
                  down/upsampling convolutions ("LoCon": kohya's conv_dim)
The text encoder (``text_encoder``): q, k, v, out_proj, mlp.c_fc, mlp.c_proj of every block it runs.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ldm.models.attention import CrossAttention, SpatialTransformer
from ldm.models.unet import Downsample, ResBlock, Upsample

UNET_GROUPS = ("attention", "transformer", "resblocks")
MAX_RANK = 4096


def float32(value: float) -> float:
    """``value`` rounded to float32, as LoRA files store alpha: a round trip through one is exact."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]


class LoRASettingsError(ValueError):
    """Settings no LoRA can have (``task.lora``, or a file's record of them): ``ldm.formats.lora.lora_spec``
    reports it as a one-line user error (the networks import nothing of the file and CLI layers)."""


@dataclass(frozen=True)
class LoRASpec:
    """How a run adapts its model (``task.lora``); ``rank`` 0 trains the whole U-Net instead.

    rank, alpha: rank r and alpha of every adapter (alpha None: = r, scale 1).
    targets: which U-Net modules (``UNET_GROUPS``).
    conv_rank, conv_alpha: for the k x k convolutions of ``resblocks`` (None: rank, alpha).
    text_encoder: also adapt the text encoder (q, k, v, out, mlp of every block it runs).
    """

    rank: int = 0
    alpha: float | None = None
    targets: Sequence[str] = ("attention",)
    conv_rank: int | None = None
    conv_alpha: float | None = None
    text_encoder: bool = False

    def __post_init__(self) -> None:
        for name in ("rank", "conv_rank"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RANK
            ):
                raise LoRASettingsError(f"task.lora.{name} must be an integer in 0..{MAX_RANK}, got {value!r}")
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if value is not None:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                    or value <= 0
                ):
                    raise LoRASettingsError(
                        f"task.lora.{name} must be a positive number (or null: = rank), got {value!r}"
                    )
                object.__setattr__(self, name, float32(value))
        targets = tuple([self.targets] if isinstance(self.targets, str) else self.targets)
        unknown = [t for t in targets if t not in UNET_GROUPS]
        if unknown or not targets:
            raise LoRASettingsError(
                f"task.lora.targets must be a non-empty list of {', '.join(UNET_GROUPS)}, got {list(targets)}"
            )
        object.__setattr__(self, "targets", targets)
        if not isinstance(self.text_encoder, bool):
            raise LoRASettingsError(f"task.lora.text_encoder must be true or false, got {self.text_encoder!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def rank_alpha(self, module: nn.Module) -> tuple[int, float]:
        """(rank, alpha) of the adapter of ``module``: conv_* for k x k convolutions (k > 1)."""
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            rank = self.conv_rank if self.conv_rank is not None else self.rank
            alpha = self.conv_alpha if self.conv_alpha is not None else self.alpha
        else:
            rank, alpha = self.rank, self.alpha
        return rank, float32(rank) if alpha is None else alpha

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_config(cls, config: Any) -> LoRASpec:
        """A spec from a run's ``task.lora`` mapping or a checkpoint's record (untrusted: checked)."""
        if config is None:
            return cls()
        if isinstance(config, LoRASpec):
            return config
        if not isinstance(config, Mapping):
            raise LoRASettingsError(
                f"task.lora must be a mapping of {', '.join(cls.__dataclass_fields__)}, got {type(config).__name__}"
            )
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise LoRASettingsError(
                f"task.lora has no key(s) {', '.join(map(str, unknown))} (known: {', '.join(cls.__dataclass_fields__)})"
            )
        return cls(**dict(config))


# ---------------------------------------------------------------------- the update of one weight
def lora_delta(up: Tensor, down: Tensor) -> Tensor:
    """up @ down in the shape of the adapted weight, float32: (out, in) or (out, in, k, k).

    up: (out, r) or (out, r, 1, 1); down: (r, in) or (r, in, k, k). For a convolution the update is
    the 1x1 ``up`` filter applied after the k x k ``down`` one: (out, r) @ (r, in * k * k).
    """
    product = up.float().flatten(1) @ down.float().flatten(1)  # (out, in [* k * k])
    return product.view(up.shape[0], *down.shape[1:])


@dataclass
class LoRAFactors:
    """The factors of one adapted weight: W' = W + multiplier * (alpha / rank) * up @ down."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """(alpha / rank) up @ down, float32, in the shape of the adapted weight."""
        return lora_delta(self.up, self.down) * self.scale


@dataclass
class LoRAWeights:
    """A LoRA in this project's names: ``unet`` keyed by U-Net module path (``input_blocks.1.1.
    transformer_blocks.0.attn1.to_q``), ``text`` by text-tower target (``transformer.resblocks.0.
    attn.q``, see ``text_lora_targets``); ``metadata`` what its file says about it (for people)."""

    unet: dict[str, LoRAFactors] = field(default_factory=dict)
    text: dict[str, LoRAFactors] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.unet) + len(self.text)

    def ranks(self) -> list[int]:
        return sorted({f.rank for f in (*self.unet.values(), *self.text.values())})


class LoRAAdapter(nn.Module):
    """``up(down(x)) * alpha / rank`` for one Linear or Conv2d layer (see the module docstring)."""

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d | tuple[int, int],
        rank: int,
        alpha: float | None = None,
        device: torch.device | str | None = None,
    ):
        """base: the adapted layer, or (in_features, out_features) of a slice of a fused weight (q, k, v);
        the adapter is made on ``device`` (default: the base layer's)."""
        super().__init__()
        if rank < 1:
            raise ValueError(f"a LoRA adapter needs rank >= 1, got {rank}")
        self.alpha = float32(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        if device is None:
            device = "cpu" if isinstance(base, tuple) else base.weight.device
        if isinstance(base, tuple):
            self.down = nn.Linear(base[0], rank, bias=False, device=device)
            self.up = nn.Linear(rank, base[1], bias=False, device=device)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("LoRA adapters need a convolution with groups=1")
            self.down = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,
                base.stride,
                base.padding,
                base.dilation,
                bias=False,
                device=device,
            )
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device)
        elif isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, device=device)
            self.up = nn.Linear(rank, base.out_features, bias=False, device=device)
        else:
            raise TypeError(f"LoRA adapts Linear and Conv2d layers, not {type(base).__name__}")
        nn.init.zeros_(self.up.weight)  # the untrained adapter is the identity update (Hu et al. 2021, Sec. 4.1)

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """x: the base layer's input, (..., in) or (B, in, H, W) -> its output's shape."""
        return self.up(self.down(x)) * self.scale

    def factors(self) -> LoRAFactors:
        return LoRAFactors(self.down.weight.detach(), self.up.weight.detach(), self.alpha)

    def load_factors(self, factors: LoRAFactors) -> None:
        with torch.no_grad():
            self.down.weight.copy_(factors.down)
            self.up.weight.copy_(factors.up)
        self.alpha = float32(factors.alpha)
        self.scale = self.alpha / self.rank

    def delta(self) -> Tensor:
        """The update of the base weight, float32 (with gradients: the text encoder trains through it)."""
        return lora_delta(self.up.weight, self.down.weight) * self.scale


# ---------------------------------------------------------------------- what can be adapted
def unet_lora_targets(unet: nn.Module, groups: Sequence[str]) -> dict[str, nn.Linear | nn.Conv2d]:
    """Module path -> layer of every U-Net layer that ``groups`` (``UNET_GROUPS``) adapt, in module order."""
    unknown = [g for g in groups if g not in UNET_GROUPS]
    if unknown:
        raise LoRASettingsError(f"unknown LoRA target group(s) {unknown}: choose among {', '.join(UNET_GROUPS)}")
    names: list[str] = []
    for path, module in unet.named_modules():
        children: tuple[str, ...] = ()
        if isinstance(module, CrossAttention) and "attention" in groups:
            children = ("to_q", "to_k", "to_v", "to_out.0")
        elif isinstance(module, SpatialTransformer) and "transformer" in groups:
            children = ("proj_in", "proj_out") + tuple(
                f"transformer_blocks.{i}.{name}"
                for i in range(len(module.transformer_blocks))
                for name in ("ff.net.0.proj", "ff.net.2")
            )
        elif isinstance(module, ResBlock) and "resblocks" in groups:
            children = ("in_layers.2", "emb_layers.1", "out_layers.3") + (
                ("skip_connection",) if isinstance(module.skip_connection, nn.Conv2d) else ()
            )
        elif isinstance(module, Downsample) and "resblocks" in groups:
            children = ("op",)
        elif isinstance(module, Upsample) and "resblocks" in groups:
            children = ("conv",)
        names.extend(f"{path}.{child}" if path else child for child in children)
    return {name: unet.get_submodule(name) for name in sorted(set(names), key=names.index)}


def adaptable_layers(unet: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    """Every Linear and Conv2d of the U-Net by module path: what a LoRA file from another tool may adapt."""
    return {path: m for path, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@dataclass(frozen=True)
class TextTarget:
    """An adaptable weight of the text tower: ``parameter`` (tower names), rows [start, stop) of it
    (q, k and v are thirds of the fused ``attn.in_proj_weight``), and its (in, out) features."""

    parameter: str
    start: int
    stop: int
    in_features: int


def text_lora_targets(tower_state: Mapping[str, Tensor], num_blocks: int) -> dict[str, TextTarget]:
    """Target name -> weight of every adaptable projection in the first ``num_blocks`` blocks of an
    open_clip text tower (its state dict): ``transformer.resblocks.{i}.attn.{q,k,v}`` (rows of
    ``attn.in_proj_weight``), ``...attn.out_proj``, ``...mlp.c_fc``, ``...mlp.c_proj``."""
    targets: dict[str, TextTarget] = {}
    for i in range(num_blocks):
        block = f"transformer.resblocks.{i}"
        fused = tower_state[f"{block}.attn.in_proj_weight"]  # (3W, W)
        width = fused.shape[1]
        for j, name in enumerate("qkv"):
            targets[f"{block}.attn.{name}"] = TextTarget(
                f"{block}.attn.in_proj_weight", j * width, (j + 1) * width, width
            )
        for name in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = tower_state[f"{block}.{name}.weight"]
            targets[f"{block}.{name}"] = TextTarget(f"{block}.{name}.weight", 0, weight.shape[0], weight.shape[1])
    return targets


def target_features(target: TextTarget) -> tuple[int, int]:
    """(in_features, out_features) of a text target, as a Linear layer of it would have."""
    return (target.in_features, target.stop - target.start)


# ---------------------------------------------------------------------- the adapters of one model
class _Tree(nn.Module):
    """A plain container whose children mirror module paths (``a.b.0.c``), so state-dict keys read
    like the adapted layers' own names."""


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if name not in node._modules:
            node.add_module(name, _Tree())
        node = node._modules[name]
    node.add_module(leaf, module)


class LoRANetwork(nn.Module):
    """The adapters of one text-to-image model: ``unet`` (by U-Net module path) and ``text`` (by text
    target, ``text_lora_targets``). Its state dict is ``unet.<path>.down.weight``, ``...up.weight``,
    ``text.<target>.down.weight``, ...: the trained weights of a LoRA run, and all of them."""

    def __init__(
        self, unet_adapters: Mapping[str, LoRAAdapter], text_adapters: Mapping[str, LoRAAdapter] | None = None
    ):
        super().__init__()
        self.unet = _Tree()
        self.text = _Tree()
        for path, adapter in unet_adapters.items():
            _place(self.unet, path, adapter)
        for name, adapter in (text_adapters or {}).items():
            _place(self.text, name, adapter)
        self.unet_paths = list(unet_adapters)
        self.text_names = list(text_adapters or {})
        self.__dict__["_source"] = self  # whose adapters the attached hooks apply (``using``); not a submodule

    # -------------------------------------------------------------- building
    @classmethod
    def for_training(cls, spec: LoRASpec, unet: nn.Module, encoder: nn.Module | None = None) -> LoRANetwork:
        """Fresh adapters (``up`` = 0) on ``spec.targets`` of ``unet`` and, with ``spec.text_encoder``,
        on the blocks ``encoder`` (an ``OpenCLIPTextEncoder``) runs."""
        unet_adapters = {}
        for path, layer in unet_lora_targets(unet, spec.targets).items():
            rank, alpha = spec.rank_alpha(layer)
            if rank > 0:
                unet_adapters[path] = LoRAAdapter(layer, rank, alpha)
        text_adapters = {}
        if spec.text_encoder:
            if encoder is None:
                raise ValueError("task.lora.text_encoder needs the text encoder")
            alpha = float32(spec.rank) if spec.alpha is None else spec.alpha
            device = encoder.model.token_embedding.weight.device
            for name, target in text_lora_targets(encoder.model.state_dict(), encoder.num_blocks).items():
                text_adapters[name] = LoRAAdapter(target_features(target), spec.rank, alpha, device)
        return cls(unet_adapters, text_adapters)

    @classmethod
    def from_weights(cls, weights: LoRAWeights, unet: nn.Module, encoder: nn.Module | None = None) -> LoRANetwork:
        """Adapters holding ``weights`` (ranks and alphas as they are), for the modules they name."""
        layers = adaptable_layers(unet)
        unet_adapters = {}
        for path, factors in weights.unet.items():
            adapter = LoRAAdapter(layers[path], factors.rank, factors.alpha)
            adapter.load_factors(factors)
            unet_adapters[path] = adapter
        text_adapters = {}
        if weights.text:
            targets = text_lora_targets(encoder.model.state_dict(), encoder.num_blocks)
            device = encoder.model.token_embedding.weight.device
            for name, factors in weights.text.items():
                adapter = LoRAAdapter(target_features(targets[name]), factors.rank, factors.alpha, device)
                adapter.load_factors(factors)
                text_adapters[name] = adapter
        return cls(unet_adapters, text_adapters)

    def unet_adapter(self, path: str) -> LoRAAdapter:
        return self.unet.get_submodule(path)

    def text_adapter(self, name: str) -> LoRAAdapter:
        return self.text.get_submodule(name)

    def weights(self) -> LoRAWeights:
        """The factors of every adapter (detached tensors, not copies)."""
        return LoRAWeights(
            unet={path: self.unet_adapter(path).factors() for path in self.unet_paths},
            text={name: self.text_adapter(name).factors() for name in self.text_names},
        )

    # -------------------------------------------------------------- the U-Net: forward hooks
    def attach(self, unet: nn.Module) -> list[RemovableHandle]:
        """Add each adapter's output to its U-Net layer's (forward hooks; names and weights untouched)."""
        handles = []
        for path in self.unet_paths:
            layer = unet.get_submodule(path)

            def add_update(module: nn.Module, args: tuple, output: Tensor, path: str = path) -> Tensor:
                return output + self._source.unet_adapter(path)(args[0])

            handles.append(layer.register_forward_hook(add_update))
        return handles

    @contextlib.contextmanager
    def using(self, source: LoRANetwork) -> Iterator[None]:
        """Within it, the attached hooks apply ``source``'s adapters (an EMA copy of this network)."""
        previous = self._source
        self.__dict__["_source"] = source
        try:
            yield
        finally:
            self.__dict__["_source"] = previous

    # -------------------------------------------------------------- the text encoder: adapted weights
    def text_weights(self, tower: nn.Module) -> dict[str, Tensor]:
        """The tower's adapted parameters, W + sum of updates, by tower name (with gradients to the adapters)."""
        if not self.text_names:
            return {}
        parameters = dict(tower.named_parameters())
        targets = text_lora_targets({k: v.detach() for k, v in parameters.items()}, self._text_blocks())
        updates: dict[str, list[tuple[TextTarget, Tensor]]] = {}
        for name in self.text_names:
            target = targets[name]
            updates.setdefault(target.parameter, []).append((target, self.text_adapter(name).delta()))
        adapted = {}
        for parameter, parts in updates.items():
            weight = parameters[parameter]
            delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for target, update in parts:
                delta = delta.index_add(0, torch.arange(target.start, target.stop, device=weight.device), update)
            adapted[parameter] = (weight.float() + delta).to(weight.dtype)
        return adapted

    def _text_blocks(self) -> int:
        return 1 + max(int(name.split(".")[2]) for name in self.text_names)


class AdaptedUNet(nn.Module):
    """A U-Net whose attached adapters (``LoRANetwork.attach``) take their weights from ``source``
    during its forward pass: the EMA adapters for validation and sample grids. Not a submodule of
    the task (it holds the U-Net, whose weights are stored once)."""

    def __init__(self, unet: nn.Module, network: LoRANetwork, source: LoRANetwork):
        super().__init__()
        self.unet = unet
        self.__dict__["network"] = network  # plain attributes: not submodules of this wrapper
        self.__dict__["source"] = source
        for name in ("in_channels", "out_channels", "downsampling_factor", "self_conditioning", "patch_size"):
            if hasattr(unet, name):
                self.__dict__[name] = getattr(unet, name)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.network.using(self.source):
            return self.unet(*args, **kwargs)


class AdaptedTextEncoder(nn.Module):
    """An ``OpenCLIPTextEncoder`` computed with its tower's weights adapted by ``network`` (its text
    adapters): the same prompts -> (B, L, D) contract, gradients flowing to the adapters."""

    def __init__(self, encoder: nn.Module, network: LoRANetwork):
        super().__init__()
        self.encoder = encoder
        self.__dict__["network"] = network

    @property
    def context_dim(self) -> int:
        return self.encoder.context_dim

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.encoder.tokenize(prompts)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> hidden states (B, max_length, context_dim) of the adapted tower."""
        weights = {f"model.{k}": v for k, v in self.network.text_weights(self.encoder.model).items()}
        return torch.func.functional_call(self.encoder, weights, (list(prompts),), strict=False)


# ---------------------------------------------------------------------- merging into weights
def merge_unet(
    state: dict[str, Tensor], factors: Mapping[str, LoRAFactors], multiplier: float = 1.0
) -> dict[str, Tensor]:
    """U-Net tensors (our names) with ``multiplier`` x each update added to ``<path>.weight``, in float32.

    Returns a new dict; tensors not adapted are the same objects as in ``state``."""
    merged = dict(state)
    for path, f in factors.items():
        key = f"{path}.weight"
        merged[key] = merged[key].float() + multiplier * f.delta()
    return merged


def merge_text(
    state: dict[str, Tensor], factors: Mapping[str, LoRAFactors], num_blocks: int, multiplier: float = 1.0
) -> dict[str, Tensor]:
    """Text-tower tensors (open_clip names) with the updates added (q, k, v into their rows of ``in_proj_weight``)."""
    merged = dict(state)
    if not factors:
        return merged
    targets = text_lora_targets(state, num_blocks)
    for name, f in factors.items():
        target = targets[name]
        weight = (
            merged[target.parameter].float().clone()
            if merged[target.parameter] is state[target.parameter]
            else merged[target.parameter]
        )
        weight[target.start : target.stop] += multiplier * f.delta()
        merged[target.parameter] = weight
    return merged
