"""Image-to-image (SDEdit, Meng et al. 2022): noise an image's latent part of the way and denoise from there.

SDEdit (Sec. 3, Algorithm 1) draws x_t ~ q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) for the input x_0 at
a chosen t_0 = strength * T and runs the reverse process from t_0 to 0: the larger the strength, the
more of the input is replaced by what the model and the prompt make of it.

With a sampler's grid of n timesteps the strength picks where on the grid to start, as diffusers'
``StableDiffusionImg2ImgPipeline.get_timesteps`` does (tested against it): the last int(n * strength)
timesteps are run, so strength 0.6 of a 20-step trailing grid (999, 949, ..., 49) starts at t = 599 and
takes 12 steps. At strength 1 the whole grid is run from the prior, x = eps, exactly the text-to-image
start (diffusers' inpainting pipeline does the same, ``is_strength_max``; its image-to-image pipeline
instead noises the image to t = T - 1, which keeps alpha_{T-1} ~ 0.07 of it on SD's schedule). At
strength 0 no step is run and the latent is the input's.
"""

from __future__ import annotations

from torch import Tensor

from ldm.diffusion.parameterization import add_noise
from ldm.diffusion.schedules import NoiseSchedule


def check_strength(strength: float) -> float:
    """``strength`` as a float in [0, 1], or a ValueError."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    return float(strength)


def strength_timesteps(timesteps: Tensor, strength: float) -> Tensor:
    """The tail of a descending grid that image-to-image runs: its last int(n * strength) timesteps, (k,).

    The first of them is the timestep the input is noised to. diffusers' convention: init_timestep =
    min(int(n * strength), n), t_start = n - init_timestep, ``timesteps[t_start:]``."""
    strength = check_strength(strength)
    n = len(timesteps)
    kept = min(int(n * strength), n)
    return timesteps[n - kept :]


def noised_start(latents: Tensor, noise: Tensor, timesteps: Tensor, full_grid: bool, schedule: NoiseSchedule) -> Tensor:
    """x at the first timestep of a (tail of a) grid: alpha_t x_0 + sigma_t eps (SDEdit's q(x_t | x_0)),
    the pure noise eps when the grid is whole (strength 1: text-to-image's start), and x_0 itself when
    the grid is empty (strength 0).

    latents: x_0 (B, C, h, w); noise: eps (B, C, h, w), standard normal (the image's seeded draw)."""
    if full_grid:
        return noise
    if len(timesteps) == 0:
        return latents
    t = int(timesteps[0])
    alpha = schedule.alpha(t, latents.ndim, like=latents)
    sigma = schedule.sigma(t, latents.ndim, like=latents)
    return add_noise(latents, noise, alpha, sigma)
