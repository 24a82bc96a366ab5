"""A text-to-image model as plain data: constructor configs and state dicts in this project's layout.

Every importer (SD single file, diffusers folder, our training checkpoints) produces a ``ModelBundle``
and every exporter consumes one, so each format is converted once, to and from one representation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion.schedules import NoiseSchedule, ScheduleSpec
from ldm.errors import UserError
from ldm.formats.spec import NETWORKS, checked_model_fields, checked_network_config, checked_schedule
from ldm.formats.text_encoder import load_text_weights
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm.models.unet import UNetModel

FAMILIES = ("sd1", "sd2", "custom")


def sd_schedule(zero_terminal_snr: bool = False) -> dict[str, Any]:
    """Stable Diffusion's training schedule (scaled_linear, 0.00085 -> 0.012, T = 1000), as a spec dict."""
    return ScheduleSpec(
        "scaled_linear", 1000, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=zero_terminal_snr
    ).to_dict()


def schedule_from_spec(spec: dict[str, Any]) -> NoiseSchedule:
    """The ``NoiseSchedule`` a bundle's schedule spec (``ScheduleSpec.to_dict()``) describes."""
    return ScheduleSpec.from_dict(spec).build()


@dataclass
class ModelBundle:
    """Configs and weights of the three networks, plus how the model was trained.

    ``text`` holds the open_clip text-tower layout (the names of ``OpenCLIPTextEncoder.model``).
    ``family`` is ``sd1`` or ``sd2`` for the original Stable Diffusion layouts, else ``custom``.
    """

    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text: dict[str, Tensor]
    family: str = "custom"
    prediction_type: str = "eps"
    image_size: int = 512
    schedule: dict[str, Any] = field(default_factory=sd_schedule)

    def __post_init__(self) -> None:
        # every importer ends here, so a model file's configs are checked once, whatever its format
        if self.family not in FAMILIES:
            raise UserError(f"model family must be one of {FAMILIES}, got {self.family!r}")
        for name in NETWORKS:
            setattr(self, name, checked_network_config(name, getattr(self, name)))
        self.schedule = checked_schedule(self.schedule)
        checked_model_fields(self.prediction_type, self.image_size)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-friendly data (stored in exported files)."""
        data = asdict(self)
        for key in ("unet", "vae", "text"):
            data.pop(key)
        return json.loads(json.dumps(data, default=list))

    @classmethod
    def from_metadata(cls, metadata: Any, unet, vae, text) -> ModelBundle:
        """A bundle from ``metadata()`` as stored in a file (checked: a file is untrusted)."""
        fields = ("unet_config", "vae_config", "text_config", "family", "prediction_type", "image_size", "schedule")
        if not isinstance(metadata, dict) or set(metadata) - set(fields):
            raise UserError(f"model spec: expected a mapping with keys among {', '.join(fields)}")
        return cls(**metadata, unet=unet, vae=vae, text=text)

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[nn.Module, ...]:
        """(unet, autoencoder, conditioner) with these weights, in eval mode.

        The U-Net and VAE are created on the meta device and take the tensors by assignment, so a
        large checkpoint is never held twice in memory.
        """
        with torch.device("meta"):
            unet = UNetModel(**self.unet_config)
            autoencoder = AutoencoderKL(**self.vae_config)
        # assign keeps the file's dtype: published files are mostly fp16, and the networks compute in
        # float32 unless ``dtype`` says otherwise (the VAE always: in half precision it overflows)
        unet.load_state_dict(_float32(self.unet), strict=True, assign=True)
        autoencoder.load_state_dict(_float32(self.vae), strict=True, assign=True)
        conditioner = OpenCLIPTextEncoder(**self.text_config)
        load_text_weights(conditioner, self.text)
        modules = (unet, autoencoder, conditioner)
        for module in modules:
            module.requires_grad_(False).eval().to(device)
        if dtype is not None:
            unet.to(dtype)
            conditioner.to(dtype)  # the VAE stays float32: half-precision VAEs overflow into NaNs
        return modules


def _float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def bundle_from_modules(
    unet: nn.Module,
    autoencoder: nn.Module,
    conditioner: OpenCLIPTextEncoder,
    configs: dict[str, dict[str, Any]],
    **extra: Any,
) -> ModelBundle:
    """A bundle of built modules; ``configs`` holds their constructor kwargs (unet/vae/text_config)."""
    return ModelBundle(
        unet_config=dict(configs["unet_config"]),
        vae_config=dict(configs["vae_config"]),
        text_config=dict(configs["text_config"]),
        unet=dict(unet.state_dict()),
        vae=dict(autoencoder.state_dict()),
        text={k: v for k, v in conditioner.model.state_dict().items()},
        **extra,
    )
