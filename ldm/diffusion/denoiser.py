"""From a network's raw output to the denoiser D(x_t, t) ~ E[x_0 | x_t] that every sampler uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ldm.diffusion.parameterization import PredictionType, check_prediction_type, predict_x0
from ldm.diffusion.schedules import NoiseSchedule

# network(x_t (B,C,H,W), t (B,), context) -> raw output (B,C,H,W)
Network = Callable[..., Tensor]


class Denoise(Protocol):
    """D(x_t, t) -> x_0 estimate; t is one integer timestep shared by the batch."""

    def __call__(self, x: Tensor, t: int) -> Tensor: ...


class ModelFn(Protocol):
    """f(x_t, t) -> the network's raw (eps, v or x0) output for a batch at timestep t."""

    def __call__(self, x: Tensor, t: int) -> Tensor: ...


def implied_x0(
    schedule: NoiseSchedule, prediction_type: PredictionType, output: Tensor, x_t: Tensor, t: int | Tensor
) -> Tensor:
    """The x_0 estimate a network's raw output at timestep(s) t implies, in x_t's dtype."""
    alpha = schedule.alpha(t, x_t.ndim, like=x_t)
    sigma = schedule.sigma(t, x_t.ndim, like=x_t)
    return predict_x0(prediction_type, output.to(x_t.dtype), x_t, alpha, sigma)


class SelfConditioned:
    """A self-conditioning network fed its own x_0 estimate from the previous call (Chen et al. 2023,
    "Analog Bits", Algorithm 2): zeros at the first call of a sampling run, then the x_0 implied by the
    last output. A guided batch (uncond + cond) keeps one estimate per row, so each branch sees its own.
    Stateful: make a new one for every sampling run (``sampling_network``).
    """

    def __init__(self, network: Network, schedule: NoiseSchedule, prediction_type: PredictionType):
        self.network = network
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.previous_x0: Tensor | None = None

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        if self.previous_x0 is not None and self.previous_x0.shape != x.shape:
            raise ValueError(
                f"self-conditioned network called with a batch {tuple(x.shape)} after {tuple(self.previous_x0.shape)}: "
                "use a new SelfConditioned for every sampling run"
            )
        output = self.network(x, timesteps, context, x0_estimate=self.previous_x0)
        self.previous_x0 = implied_x0(self.schedule, self.prediction_type, output, x, timesteps)
        return output


def sampling_network(network: Network, schedule: NoiseSchedule, prediction_type: PredictionType) -> Network:
    """The network as samplers call it: wrapped in a fresh ``SelfConditioned`` if it self-conditions."""
    if getattr(network, "self_conditioning", False):
        return SelfConditioned(network, schedule, prediction_type)
    return network


class Conditioned:
    """The network with its conditioning bound: f(x_t, t) = network(x_t, t, context)."""

    def __init__(self, network: Network, context: Tensor):
        self.network = network
        self.context = context

    def __call__(self, x: Tensor, t: int) -> Tensor:
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.network(x, timesteps, self.context)


class ClassifierFreeGuidance:
    """Guided output u + s (c - u) from one batched pass (Ho & Salimans 2022, Eq. 6).

    ``guidance_rescale`` (phi) rescales the guided output towards the standard deviation of the
    conditional one and mixes: phi * rescaled + (1 - phi) * guided (Lin et al. 2023, Sec. 3.4),
    which keeps zero-terminal-SNR models from over-exposing at high guidance.

    ``interval`` = (t_min, t_max) guides only at timesteps t_min <= t <= t_max and returns the
    conditional output (one pass of B) elsewhere (Kynkaanniemi et al. 2024: guidance at low noise
    mostly sharpens what is already decided, and can distort it).
    """

    def __init__(
        self,
        network: Network,
        context: Tensor,
        uncond_context: Tensor,
        scale: float,
        guidance_rescale: float = 0.0,
        interval: tuple[int, int] | None = None,
    ):
        if uncond_context.shape != context.shape:
            raise ValueError(f"uncond_context {tuple(uncond_context.shape)} must match context {tuple(context.shape)}")
        if interval is not None and not 0 <= interval[0] <= interval[1]:
            raise ValueError(f"guidance interval must be (t_min, t_max) with 0 <= t_min <= t_max, got {interval}")
        self.network = network
        self.contexts = torch.cat([uncond_context, context])  # (2B, L, D)
        self.scale = scale
        self.guidance_rescale = guidance_rescale
        self.interval = interval

    def guides_at(self, t: int) -> bool:
        return self.scale != 1.0 and (self.interval is None or self.interval[0] <= t <= self.interval[1])

    def __call__(self, x: Tensor, t: int) -> Tensor:
        if not self.guides_at(t):
            half = self.contexts.shape[0] // 2
            return Conditioned(self.network, self.contexts[half:])(x, t)
        uncond, cond = Conditioned(self.network, self.contexts)(torch.cat([x, x]), t).chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        if self.guidance_rescale > 0:
            dims = tuple(range(1, x.ndim))
            rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
            guided = self.guidance_rescale * rescaled + (1 - self.guidance_rescale) * guided
        return guided


class Denoiser:
    """D(x_t, t): the x_0 estimate implied by a model function of the given prediction type."""

    def __init__(self, model_fn: ModelFn, schedule: NoiseSchedule, prediction_type: PredictionType):
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)

    def __call__(self, x: Tensor, t: int) -> Tensor:
        return implied_x0(self.schedule, self.prediction_type, self.model_fn(x, t), x, t)
