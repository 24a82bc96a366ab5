"""Samplers for the reverse process, all with one signature.

    sample_x(denoise, x, timesteps, schedule, *, noise_sampler=None, callback=None, **options) -> x_0

denoise:    D(x_t, t) -> x_0 estimate (a ``Denoiser``, guided or not)
x:          the starting noise at timesteps[0], (B, C, H, W), standard normal (x_T = sigma_T eps, sigma_T ~ 1)
timesteps:  descending integer training timesteps the sampler visits (``sampling_timesteps``);
            after the last one every sampler steps to the clean sample (alpha = 1, sigma = 0)
noise_sampler: fresh N(0, I) noise like x for stochastic samplers (``PerSampleNoise`` makes it
            reproducible per image); defaults to torch.randn_like
callback:   called after every step as callback(i, t, x, x0_estimate); a tensor it returns replaces
            x, the state the next step starts from (inpainting's latent blending uses this)

Notation as in ``ldm.diffusion.schedules``: a (alpha) and s (sigma) of the current step t and
the next step n.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoise
from ldm.diffusion.parameterization import eps_from_x0
from ldm.diffusion.schedules import NoiseSchedule

NoiseSampler = Callable[[Tensor], Tensor]
# callback(i, t, x, x0) after step i from timestep t: None, or the state to continue from in place of x
Callback = Callable[[int, int, Tensor, Tensor], "Tensor | None"]


class PerSampleNoise:
    """Standard normal noise drawn from one generator per batch element.

    Each image's noise depends only on its own seed, so an image is reproduced exactly whatever
    batch it is sampled in (needed for resumable sampling jobs).
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __call__(self, like: Tensor) -> Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} but {len(self.generators)} seeds")
        noise = [
            torch.randn(like.shape[1:], generator=g, device=self.device, dtype=torch.float32) for g in self.generators
        ]
        return torch.stack(noise).to(device=like.device, dtype=like.dtype)


def _scales(schedule: NoiseSchedule, timesteps: Tensor) -> tuple[list[float], list[float]]:
    """alpha and sigma (float64 Python floats) at each visited step plus the clean end point (1, 0)."""
    alphas = schedule.alpha(timesteps).tolist() + [1.0]
    sigmas = schedule.sigma(timesteps).tolist() + [0.0]
    return alphas, sigmas


def _after_step(callback: Callback | None, i: int, t: int, x: Tensor, x0: Tensor) -> Tensor:
    """The state after step i: x, or what the callback returns in its place."""
    if callback is None:
        return x
    replaced = callback(i, t, x, x0)
    return x if replaced is None else replaced


def _noise(noise_sampler: NoiseSampler | None, x: Tensor) -> Tensor:
    return noise_sampler(x) if noise_sampler is not None else torch.randn_like(x)


@torch.no_grad()
def sample_ddim(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12), deterministic at eta = 0, DDPM-like at eta = 1.

    x_n = a_n x0 + sqrt(s_n^2 - c^2) eps + c z,  c = eta (s_n / s_t) sqrt(1 - a_t^2 / a_n^2)  (Eq. 16)
    """
    alphas, sigmas = _scales(schedule, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a_t, s_t, a_n, s_n = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        x0 = denoise(x, t)
        eps = eps_from_x0(x0, x, a_t, s_t)
        c = eta * (s_n / s_t) * max(1 - (a_t / a_n) ** 2, 0.0) ** 0.5
        x = a_n * x0 + max(s_n**2 - c**2, 0.0) ** 0.5 * eps
        if c > 0:
            x = x + c * _noise(noise_sampler, x)
        x = _after_step(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_n | x_t, x0) (Ho et al. 2020, Eqs. 6-7).

    Over a strided grid the step uses a_tn = a_t / a_n and b_tn = 1 - a_tn^2 in place of
    sqrt(alpha_t) and beta_t:
        mean = (a_n b_tn / s_t^2) x0 + (a_tn s_n^2 / s_t^2) x_t,   var = b_tn s_n^2 / s_t^2.
    With all T steps it is Algorithm 2 of the paper with the posterior variance beta-tilde.
    """
    alphas, sigmas = _scales(schedule, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a_t, s_t, a_n, s_n = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        x0 = denoise(x, t)
        x = ddpm_step(x, x0, a_t, s_t, a_n, s_n, lambda like=x: _noise(noise_sampler, like))
        x = _after_step(callback, i, t, x, x0)
    return x


def ddpm_step(
    x: Tensor, x0: Tensor, a_t: float, s_t: float, a_n: float, s_n: float, noise: Callable[[], Tensor]
) -> Tensor:
    """One draw from the posterior q(x_n | x_t, x0) between any two timesteps n < t (``sample_ddpm``'s
    step; RePaint's resampling reuses it). ``noise()`` gives N(0, I) like x, called only when needed."""
    a_tn = a_t / a_n
    b_tn = 1 - a_tn**2
    mean = (a_n * b_tn / s_t**2) * x0 + (a_tn * s_n**2 / s_t**2) * x
    variance = b_tn * s_n**2 / s_t**2
    return mean + variance**0.5 * noise() if variance > 0 else mean


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), multistep second order in log-SNR (Lu et al. 2022, Algorithm 2).

    With lambda = log(a / s) and h = lambda_n - lambda_t:
        x_n = (s_n / s_t) x_t - a_n (e^{-h} - 1) D,   D = (1 + 1/2r) x0_t - (1/2r) x0_prev,  r = h_prev / h
    First order (D = x0_t) at the first step and at the last step into sigma = 0. Deterministic:
    ``noise_sampler`` is accepted for the shared signature and unused.
    """
    del noise_sampler
    alphas, sigmas = _scales(schedule, timesteps)
    lambdas = [_log_snr(a, s) for a, s in zip(alphas, sigmas)]
    x0_prev, h_prev = None, None
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps.tolist()):
        x0 = denoise(x, t)
        h = lambdas[i + 1] - lambdas[i]
        if x0_prev is None or i == last:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * _expm1_neg(h) * d
        x0_prev, h_prev = x0, h
        x = _after_step(callback, i, t, x, x0)
    return x


def _log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), +-inf at the end points."""
    if alpha == 0.0:
        return float("-inf")
    if sigma == 0.0:
        return float("inf")
    return float(torch.tensor(alpha / sigma, dtype=torch.float64).log())


def _expm1_neg(h: float) -> float:
    """e^{-h} - 1, exact for h = inf (-> -1)."""
    return float(torch.expm1(torch.tensor(-h, dtype=torch.float64)))


@torch.no_grad()
def sample_euler(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler steps of the probability-flow ODE dx~/ds = (x~ - D) / s in x~ = x / a, s = s_t / a_t
    (Karras et al. 2022, Algorithm 2 without churn).

    One Euler step in (s, x~) is exactly a DDIM step (eta = 0) in (a, s, x): both give
    x_n = a_n D + s_n eps. It is written in the second form, which stays finite at zero terminal
    SNR (a_t = 0, s = inf); the samplers differ only in the grid they are given (e.g. Karras).
    """
    return sample_ddim(denoise, x, timesteps, schedule, eta=0.0, noise_sampler=noise_sampler, callback=callback)


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``) in x~ = x / a, s = s_t / a_t:
    step down to s_down with the ODE, then add noise of std s_up, where
    s_up = min(s_n, eta sqrt(s_n^2 (s_t^2 - s_n^2) / s_t^2)) and s_down = sqrt(s_n^2 - s_up^2).
    """
    alphas, sigmas = _scales(schedule, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a_t, a_n = alphas[i], alphas[i + 1]
        x0 = denoise(x, t)
        s_t = _ve_sigma(a_t, sigmas[i])
        s_n = sigmas[i + 1] / a_n
        s_up = min(s_n, eta * (s_n**2 * (1 - (s_n / s_t) ** 2)) ** 0.5)  # s_t = inf: eta * s_n
        s_down = max(s_n**2 - s_up**2, 0.0) ** 0.5
        eps = eps_from_x0(x0, x, a_t, sigmas[i])
        x = a_n * (x0 + s_down * eps)  # x~ = D + s_down * eps, the ODE solution at s_down
        if s_up > 0:
            x = x + a_n * s_up * _noise(noise_sampler, x)
        x = _after_step(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1
    without churn): an Euler step, then the trapezoid rule with the slope at the end point.

    Two network evaluations per step except the last (to s = 0, plain Euler) and a first step from
    zero terminal SNR (infinite s: the Euler step is exact there). Deterministic.
    """
    del noise_sampler
    alphas, sigmas = _scales(schedule, timesteps)
    steps = timesteps.tolist()
    for i, t in enumerate(steps):
        a_t, s_t, a_n, s_n = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        x0 = denoise(x, t)
        eps = eps_from_x0(x0, x, a_t, s_t)  # the slope dx~/ds at t
        x_euler = a_n * x0 + s_n * eps
        if s_n == 0 or a_t == 0:
            x = x_euler
        else:
            x0_next = denoise(x_euler, steps[i + 1])
            eps_next = eps_from_x0(x0_next, x_euler, a_n, s_n)  # the slope at n
            ds = s_n / a_n - s_t / a_t
            x = a_n * (x / a_t + ds * 0.5 * (eps + eps_next))
        x = _after_step(callback, i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022, Sec. 5; k-diffusion's
    ``sample_dpmpp_2m_sde``). With lambda = log(a / s), h = lambda_n - lambda_t and g = (1 + eta) h:

        x_n = (s_n / s_t) e^{-eta h} x_t + a_n (1 - e^{-g}) D
              + 0.5 a_n (1 - e^{-g}) (D - D_prev) / r + s_n sqrt(1 - e^{-2 eta h}) z,   r = h_prev / h

    eta = 0 is the deterministic DPM-Solver++(2M) with a midpoint correction.
    """
    alphas, sigmas = _scales(schedule, timesteps)
    lambdas = [_log_snr(a, s) for a, s in zip(alphas, sigmas)]
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps.tolist()):
        x0 = denoise(x, t)
        a_n, s_n = alphas[i + 1], sigmas[i + 1]
        if s_n == 0:
            x = x0  # the last step lands on the denoised sample
        else:
            h = lambdas[i + 1] - lambdas[i]
            decay = -_expm1_neg((1 + eta) * h)  # 1 - e^{-(1 + eta) h}
            x = (s_n / sigmas[i]) * _exp_neg(eta * h) * x + a_n * decay * x0
            if x0_prev is not None and h_prev != float("inf"):
                x = x + 0.5 * a_n * decay * (h / h_prev) * (x0 - x0_prev)
            if eta > 0:
                x = x + s_n * (-_expm1_neg(2 * eta * h)) ** 0.5 * _noise(noise_sampler, x)
            h_prev = h
        x0_prev = x0
        x = _after_step(callback, i, t, x, x0)
    return x


def _ve_sigma(alpha: float, sigma: float) -> float:
    """s = sigma / alpha, the noise level of x / alpha; infinite at zero terminal SNR."""
    return float("inf") if alpha == 0 else sigma / alpha


def _exp_neg(h: float) -> float:
    """e^{-h}, exact for h = inf."""
    return float(torch.exp(torch.tensor(-h, dtype=torch.float64)))


# Adams-Bashforth weights on the newest-first eps history, by how many estimates there are
# (PNDM, Liu et al. 2022, Eq. 12; the lower orders are its warm-up as CompVis/diffusers run it)
_PLMS_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_plms(
    denoise: Denoise,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Pseudo linear multistep (PLMS; Liu et al. 2022, "PNDM", Eqs. 11-12): each step is the DDIM
    transfer (Eq. 11, eta 0) from x_t driven by a linear combination of the last eps estimates,

        eps' = (55 e_t - 59 e_{t-1} + 37 e_{t-2} - 9 e_{t-3}) / 24,
        x_n  = a_n x0' + s_n eps',   x0' = (x_t - s_t eps') / a_t.

    Warm-up as in CompVis' ``PLMSSampler`` and diffusers' ``PNDMScheduler(skip_prk_steps=True)``, which
    this matches step for step (tested): the first step is a pseudo improved Euler step (a DDIM step to
    n, eps there, then the step redone from x_t with the mean of both eps; the extra eps is discarded,
    which is why diffusers repeats the second timestep), then Adams-Bashforth of order 2 and 3, then 4.
    N steps cost N + 1 network calls. The paper's own warm-up, pseudo Runge-Kutta (PRK: three
    4-stage steps at half-step midpoints, 12 calls; diffusers' default ``skip_prk_steps=False``), is
    not run: SD ships PLMS with the improved-Euler start, and PRK needs timesteps between grid points.

    The eps history is combined whatever the prediction type (diffusers' PNDM instead combines raw v
    outputs for v-prediction, a different method). The weights assume equal steps, as in both references,
    so the grid should be evenly spaced (``leading``, or ``trailing`` where steps divide T). Measured on
    Gaussian data (tested): order 4 where the noise level s / a is linear in t, order 2 on SD's schedule,
    where even steps in t are uneven in s / a, the variable the transfer integrates over (with a smaller
    error than DPM-Solver++(2M) at 25-100 steps). The first step is plain DDIM where the corrector cannot
    run: from zero terminal SNR (a_t = 0, x0' would divide by 0) and for a single step (no eps at the
    clean end point).
    Deterministic: ``noise_sampler`` is accepted for the shared signature and unused.
    """
    del noise_sampler
    alphas, sigmas = _scales(schedule, timesteps)
    steps = timesteps.tolist()
    history: list[Tensor] = []  # eps estimates, newest first
    for i, t in enumerate(steps):
        a_t, s_t, a_n, s_n = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        x0 = denoise(x, t)
        eps = eps_from_x0(x0, x, a_t, s_t)
        history = [eps, *history[:3]]
        if a_t == 0:  # zero terminal SNR: eps' = eps, the DDIM step in its finite form
            x_next = a_n * x0 + s_n * eps
        elif not history[1:] and i + 1 < len(steps):  # pseudo improved Euler (2nd order) warm-up
            x_euler = _transfer(x, eps, a_t, s_t, a_n, s_n)
            eps_euler = eps_from_x0(denoise(x_euler, steps[i + 1]), x_euler, a_n, s_n)
            x_next = _transfer(x, 0.5 * (eps + eps_euler), a_t, s_t, a_n, s_n)
        else:
            combined = sum(w * e for w, e in zip(_PLMS_WEIGHTS[len(history)], history))
            x_next = _transfer(x, combined, a_t, s_t, a_n, s_n)
        x = x_next
        x = _after_step(callback, i, t, x, x0)
    return x


def _transfer(x: Tensor, eps: Tensor, a_t: float, s_t: float, a_n: float, s_n: float) -> Tensor:
    """PNDM's transfer phi(x_t, eps, t, n) (Liu et al. 2022, Eq. 11): the DDIM (eta 0) step with a given eps."""
    return a_n * (x - s_t * eps) / a_t + s_n * eps
