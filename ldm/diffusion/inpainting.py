"""Inpainting with any model: the known region is kept by latent blending, optionally with RePaint's resampling.

Latent blending (the "replacement" method: Song et al. 2021, score SDE, Sec. 5 / App. I.2; Avrahami et al.
2022; Lugmayr et al. 2022, Eq. 8): after every sampler step to timestep n the known region of the state
is replaced by the input noised to n,

    x_n <- m * x_n + (1 - m) * (alpha_n z_0 + sigma_n eps),     m = 1 where the region is repainted,

so after the last step (alpha = 1, sigma = 0) the known region is z_0 exactly. Each blend draws fresh
noise eps from the image's own noise generator (RePaint's Eq. 8, x_known ~ q(x_n | x_0)), so a rerun with
the same seed repeats it. (diffusers' ``StableDiffusionInpaintPipeline`` with a 4-channel U-Net reuses
the starting noise at every step instead; on a correlated Gaussian, where the conditional is known in
closed form, that leaves the repainted pixels' spread 40% too wide against 18% with fresh noise, both
with DDPM, 50 steps: tests/diffusion/test_inpainting.py.) It runs as the samplers' ``callback``, whose
returned tensor replaces the state, so every sampler inpaints.

The blend only tells the model what the known region looks like at the current step; the repainted
region can still disagree with it (the model never conditions on the known region, it just sees it).
RePaint (Lugmayr et al. 2022, Algorithm 1, Sec. 4.2) harmonises the two by resampling: every
``jump_length`` steps the state is noised back up that many grid steps with the forward process,
q(x_u | x_n) = N((alpha_u / alpha_n) x_n, (sigma_u^2 - (alpha_u / alpha_n)^2 sigma_n^2) I), and walked down
again with ancestral (DDPM posterior) steps and blending, ``resample_steps - 1`` times over, so each
segment of the grid is traversed ``resample_steps`` times (the paper's U, with j = jump_length; it uses
U = j = 10). The walks down use RePaint's own DDPM steps whatever the sampler; a multistep sampler's
history (DPM-Solver++, PLMS) then predates the resampling, so ancestral samplers suit it best.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.denoiser import Denoise
from ldm.diffusion.samplers import NoiseSampler, ddpm_step
from ldm.diffusion.schedules import NoiseSchedule


def latent_mask(mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """A pixel mask (B, 1, H, W), 1 = repaint, on the latent grid (B, 1, h, w) with H = f h, W = f w.

    A latent cell is repainted when any pixel of its f x f block is (a max-pool): a cell half inside
    the mask is not "known", and keeping it would freeze a seam of the old content at the border.
    (diffusers samples the nearest pixel instead, which can keep such cells.)"""
    height, width = mask.shape[-2:]
    h, w = latent_size
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"mask of {height}x{width} pixels does not tile a {h}x{w} latent grid")
    factor = height // h
    binary = (mask >= 0.5).to(torch.float32)
    return F.max_pool2d(binary, kernel_size=factor) if factor > 1 else binary  # (B, 1, h, w)


class LatentBlending:
    """The samplers' callback for inpainting: after each step keep the known region at the input's noise
    level (and RePaint's resampling when ``resample_steps`` > 1).

    known:     z_0 of the input image, (B, C, h, w)
    mask:      (B, 1, h, w) (or broadcastable), 1 = repaint, 0 = keep (``latent_mask``)
    timesteps: the sampler's grid (descending); step i goes from timesteps[i] to timesteps[i + 1],
               the last to the clean sample
    noise_sampler: per-image N(0, I) noise (``PerSampleNoise``) for the known region and RePaint's jumps
    denoise:   the (guided) denoiser, for RePaint's walks down
    """

    def __init__(
        self,
        known: Tensor,
        mask: Tensor,
        timesteps: Tensor,
        schedule: NoiseSchedule,
        noise_sampler: NoiseSampler | None = None,
        *,
        resample_steps: int = 1,
        jump_length: int = 1,
        denoise: Denoise | None = None,
    ):
        if resample_steps < 1 or jump_length < 1:
            raise ValueError(f"resample_steps and jump_length must be >= 1, got {resample_steps}, {jump_length}")
        if resample_steps > 1 and denoise is None:
            raise ValueError("RePaint resampling (resample_steps > 1) needs the denoiser")
        self.known = known
        self.mask = mask.to(known.dtype)
        self.steps = [int(t) for t in timesteps]
        self.alphas = schedule.alpha(timesteps).tolist() + [1.0]  # at each grid point, then the clean end
        self.sigmas = schedule.sigma(timesteps).tolist() + [0.0]
        self.resample_steps = resample_steps
        self.jump_length = jump_length
        self.denoise = denoise
        self.noise_sampler = noise_sampler

    def blend(self, x: Tensor, k: int, noise: Tensor | None = None) -> Tensor:
        """x at grid point k (k = len(grid): the clean end) with the known region replaced by
        alpha_k z_0 + sigma_k eps, eps fresh unless given."""
        known = self.known
        if self.sigmas[k] > 0:
            known = self.alphas[k] * known + self.sigmas[k] * (self._fresh_noise(x) if noise is None else noise)
        return self.mask * x + (1 - self.mask) * known

    def start(self, x: Tensor, noise: Tensor) -> Tensor:
        """The sampler's starting state at timesteps[0] with the known region noised by the image's
        starting noise (what the rest of the state was drawn from)."""
        return self.blend(x, 0, noise)

    def __call__(self, i: int, t: int, x: Tensor, x0: Tensor) -> Tensor:
        landed = i + 1  # the grid point step i went to
        x = self.blend(x, landed)
        if self.resample_steps > 1 and landed % self.jump_length == 0 and landed < len(self.steps):
            for _ in range(self.resample_steps - 1):
                x = self._resample(x, landed - self.jump_length, landed)
        return x

    def _resample(self, x: Tensor, up: int, down: int) -> Tensor:
        """Noise x from grid point ``down`` back up to ``up`` (the forward process), walk down again."""
        a_u, s_u, a_d, s_d = self.alphas[up], self.sigmas[up], self.alphas[down], self.sigmas[down]
        ratio = a_u / a_d
        x = ratio * x + max(s_u**2 - ratio**2 * s_d**2, 0.0) ** 0.5 * self._fresh_noise(x)
        x = self.blend(x, up)
        for k in range(up, down):
            x0 = self.denoise(x, self.steps[k])
            a_t, s_t, a_n, s_n = self.alphas[k], self.sigmas[k], self.alphas[k + 1], self.sigmas[k + 1]
            x = self.blend(ddpm_step(x, x0, a_t, s_t, a_n, s_n, lambda like=x: self._fresh_noise(like)), k + 1)
        return x

    def _fresh_noise(self, like: Tensor) -> Tensor:
        return self.noise_sampler(like) if self.noise_sampler is not None else torch.randn_like(like)


def network_calls(num_steps: int, resample_steps: int, jump_length: int) -> int:
    """Denoiser calls of a one-call-per-step sampler with RePaint resampling over ``num_steps`` steps."""
    jumps = (num_steps - 1) // jump_length if resample_steps > 1 else 0  # not from the clean end
    return num_steps + jumps * (resample_steps - 1) * jump_length
