"""Text-to-image sampling with a latent diffusion model: prompts -> context -> sampler -> VAE decode;
also from input images (image-to-image, inpainting) and guided by a noise-aware classifier."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.diffusion.classifier_guidance import ClassifierGuidance, ClassLogLikelihood
from ldm.diffusion.denoiser import ClassifierFreeGuidance, Conditioned, Denoiser, sampling_network
from ldm.diffusion.img2img import noised_start, strength_timesteps
from ldm.diffusion.inpainting import LatentBlending, latent_mask
from ldm.diffusion.parameterization import PredictionType
from ldm.diffusion.samplers import PerSampleNoise
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timesteps import sampling_timesteps
from ldm.errors import UserError
from ldm.formats import load_bundle
from ldm.formats.bundle import schedule_from_spec
from ldm.formats.lora import apply_loras, read_lora

# sample_x(denoise, x, timesteps, schedule, *, noise_sampler, callback) -> x0, options already bound
Sampler = Callable[..., Tensor]


@dataclass(frozen=True)
class ImageInputs:
    """What image-to-image (SDEdit) and inpainting start from, for one batch.

    images:   (B, 3, H, W) in [0, 1], already at the size being sampled
    strength: the share of the sampler's grid to run (``ldm.diffusion.img2img``): 0 returns the
              input through the VAE, 1 starts from pure noise
    masks:    (B, 1, H, W), 1 (white) = repaint, 0 = keep; None = image-to-image
    resample_steps, jump_length: RePaint's U and j (``ldm.diffusion.inpainting``); 1 = blending alone
    """

    images: Tensor
    strength: float
    masks: Tensor | None = None
    resample_steps: int = 1
    jump_length: int = 1


@dataclass(frozen=True)
class ClassifierGuide:
    """Classifier guidance for one batch (Dhariwal & Nichol 2021): a noise-aware classifier returning
    {attribute: logits (B, classes)} for (z_t, t), the wanted class indices {attribute: (B,)} (-1 = any)
    and the scale s of eps' = eps - s sigma_t grad log p(y | z_t)."""

    classifier: nn.Module
    labels: Mapping[str, Tensor]
    scale: float


class TextToImage:
    """Generate images for prompts; every image is fixed by its own seed, whatever its batch.

    unet, autoencoder, conditioner: the three networks (the U-Net may be the EMA copy).
    latent_shape: (C, h, w) of the latents the U-Net was trained on.
    autocast_dtype: run the U-Net and text encoder under autocast in this dtype (bf16/fp16 on
        GPUs); the VAE always decodes in float32, where fp16 VAEs overflow to NaNs.
    """

    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        conditioner: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: PredictionType,
        latent_shape: tuple[int, int, int],
        autocast_dtype: torch.dtype | None = None,
    ):
        self.unet = unet
        self.autoencoder = autoencoder
        self.conditioner = conditioner
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.latent_shape = tuple(latent_shape)
        self.autocast_dtype = autocast_dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the U-Net's."""
        return size_multiple(self.autoencoder, self.unet)

    @property
    def image_size(self) -> int:
        """The side of the model's square images in pixels (what ``size=None`` samples)."""
        return self.latent_shape[1] * getattr(self.autoencoder, "downsampling_factor", 1)

    def latent_shape_for(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H/f, W/f) for images of ``height`` x ``width`` pixels, or a one-line error."""
        check_side("height", height, self.size_multiple)
        check_side("width", width, self.size_multiple)
        factor = getattr(self.autoencoder, "downsampling_factor", 1)
        return (self.latent_shape[0], height // factor, width // factor)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: Sampler,
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        negative_prompt: str = "",
        spacing: str = "trailing",
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[int, int] | None = None,
        size: tuple[int, int] | None = None,
        *,
        init: ImageInputs | None = None,
        classifier: ClassifierGuide | None = None,
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1], float32, one per (prompt, seed) pair.

        size: (H, W) in pixels, multiples of ``size_multiple``; None = the model's square.
        init: start from these images (image-to-image; inpainting with masks). classifier: guide by it."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        latents = self.sample_latents(
            prompts,
            seeds,
            sampler,
            num_steps,
            guidance_scale,
            negative_prompt,
            spacing,
            guidance_rescale,
            guidance_interval,
            size,
            init=init,
            classifier=classifier,
        )
        return self.decode(latents)

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: Sampler,
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        negative_prompt: str = "",
        spacing: str = "trailing",
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[int, int] | None = None,
        size: tuple[int, int] | None = None,
        *,
        init: ImageInputs | None = None,
        classifier: ClassifierGuide | None = None,
    ) -> Tensor:
        """Scaled latents (B, C, h, w) from the sampler, before decoding (h, w = size / VAE factor).

        Every image's noise comes from its seed: the first draw is its starting noise eps (also what
        image-to-image noises the input with), later draws feed stochastic samplers and, when
        inpainting, the known region's noise at each step and RePaint's jumps."""
        device = self.device
        shape = self.latent_shape if size is None else self.latent_shape_for(*size)
        noise = PerSampleNoise(list(seeds), device=device)
        eps = noise(torch.empty(len(prompts), *shape, device=device))  # (B, C, h, w)
        timesteps = sampling_timesteps(self.schedule.num_timesteps, num_steps, spacing, self.schedule)
        x, known = eps, None
        if init is not None:
            known = self.encode(_checked_images(init.images, len(prompts), shape, self.size_factor))  # z_0
            grid = timesteps
            timesteps = strength_timesteps(grid, init.strength)
            x = noised_start(known, eps, timesteps, len(timesteps) == len(grid), self.schedule)
        with self._autocast():
            context = self.conditioner(list(prompts))  # (B, L, D)
            network = sampling_network(self.unet, self.schedule, self.prediction_type)
            if guidance_scale == 1.0:
                model_fn = Conditioned(network, context)
            else:
                uncond = self.conditioner([negative_prompt] * len(prompts))  # (B, L, D)
                model_fn = ClassifierFreeGuidance(
                    network, context, uncond, guidance_scale, guidance_rescale, guidance_interval
                )
            model_fn = _float32_output(model_fn)
            if classifier is not None:
                log_likelihood = ClassLogLikelihood(classifier.classifier, classifier.labels)
                model_fn = ClassifierGuidance(
                    model_fn, log_likelihood, classifier.scale, self.schedule, self.prediction_type
                )
            denoise = Denoiser(model_fn, self.schedule, self.prediction_type)
            blend = None
            if init is not None and init.masks is not None:
                mask = latent_mask(init.masks.to(device), shape[1:])  # (B, 1, h, w), 1 = repaint
                blend = LatentBlending(
                    known,
                    mask,
                    timesteps,
                    self.schedule,
                    noise,
                    resample_steps=init.resample_steps,
                    jump_length=init.jump_length,
                    denoise=denoise,
                )
                x = blend.start(x, eps)
            if len(timesteps) == 0:  # strength 0: nothing to sample, the input's latent
                return x
            return sampler(denoise, x, timesteps, self.schedule, noise_sampler=noise, callback=blend)

    @property
    def size_factor(self) -> int:
        """Pixels per latent cell along each side (the VAE's downsampling)."""
        return getattr(self.autoencoder, "downsampling_factor", 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents z_0 (B, C, H/f, W/f): the VAE posterior's mean
        times the scaling factor, in float32 (the mean, not a draw: the input's latent, with no seed)."""
        with torch.autocast(images.device.type, enabled=False):
            posterior = self.autoencoder.encode(images.to(self.device, torch.float32) * 2 - 1)
        return self.autoencoder.scaling_factor * posterior.mode()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1], decoded in float32."""
        with torch.autocast(latents.device.type, enabled=False):
            images = self.autoencoder.decode_from_latent(latents.float())  # (B, 3, H, W) in ~[-1, 1]
        return ((images + 1) / 2).clamp(0, 1)


def _checked_images(images: Tensor, batch: int, latent_shape: tuple[int, ...], factor: int) -> Tensor:
    """Input images must be (B, 3, H, W) at the sampled size (the job resizes them)."""
    expected = (batch, 3, latent_shape[1] * factor, latent_shape[2] * factor)
    if tuple(images.shape) != expected:
        raise ValueError(f"init images of shape {tuple(images.shape)}, expected {expected}")
    return images


def _float32_output(model_fn):
    """Keep the sampler's state in float32 when the network runs under autocast."""

    def wrapped(x: Tensor, t: int) -> Tensor:
        return model_fn(x, t).float()

    return wrapped


def size_multiple(autoencoder: nn.Module, unet: nn.Module) -> int:
    """The VAE halves the image (levels - 1) times, the U-Net its latent (levels - 1) times more:
    a side that is not a multiple of both fails at a skip connection deep in the U-Net."""
    return getattr(autoencoder, "downsampling_factor", 1) * getattr(unet, "downsampling_factor", 1)


def check_side(name: str, value: int, multiple: int) -> None:
    """Refuse an image side the networks cannot halve evenly, naming the nearest sizes that work."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive number of pixels, got {value!r}")
    if value % multiple:
        below = max(multiple, value // multiple * multiple)
        raise UserError(
            f"{name}={value} must be a multiple of {multiple} (the VAE's and the U-Net's downsampling): "
            f"use {below} or {below + multiple if below < value else 2 * multiple}"
        )


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on the CPU."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def pipeline_from_checkpoint(
    path: str,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    image_size: int | None = None,
    loras: Sequence[tuple[str, float]] = (),
) -> tuple[TextToImage, dict]:
    """A pipeline for any model file: a training checkpoint (rebuilt from the config stored in it),
    an original SD single file, or a diffusers folder, with ``loras`` ((file, scale) pairs: kohya,
    diffusers or LoRA-run checkpoints) merged into its weights. Returns it and the model's metadata."""

    bundle = load_bundle(path, use_ema, prediction_type, image_size)
    if loras:
        bundle = apply_loras(bundle, [(read_lora(file, bundle), scale) for file, scale in loras])
    unet, autoencoder, conditioner = bundle.build(device)
    check_side("image_size", bundle.image_size, size_multiple(autoencoder, unet))
    latent_size = bundle.image_size // autoencoder.downsampling_factor
    pipeline = TextToImage(
        unet,
        autoencoder,
        conditioner,
        schedule_from_spec(bundle.schedule),
        bundle.prediction_type,
        (unet.in_channels, latent_size, latent_size),
        autocast_dtype,
    )
    return pipeline, bundle.metadata()
