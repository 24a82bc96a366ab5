"""The denoising objective: timestep and noise sampling, targets, and loss weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.parameterization import PredictionType, add_noise, check_prediction_type, training_target
from ldm.diffusion.schedules import NoiseSchedule


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: PredictionType) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, Eq. 10 and Sec. 3.4) for each prediction type.

    The paper's weight on the x_0 error is min(SNR, gamma). The eps and v losses differ from the
    x_0 loss by the factors SNR and SNR + 1, so the equivalent weights are
    min(SNR, gamma) / SNR  (eps)  and  min(SNR, gamma) / (SNR + 1)  (v).
    The eps form is written as min(1, gamma / SNR) so that SNR = 0 (zero terminal SNR) gives 1, not 0/0.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "x0":
        return snr.clamp(max=gamma)
    if prediction_type == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    return (gamma / snr.clamp(min=torch.finfo(snr.dtype).tiny)).clamp(max=1.0)


def x0_error_factor(snr: Tensor, prediction_type: PredictionType) -> Tensor:
    """f with || x0_hat - x0 ||^2 = f * || prediction - target ||^2 for the x0 implied by a prediction.

    With x_t = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1): x0_hat - x0 = -(sigma / alpha) (eps_hat - eps)
    = -sigma (v_hat - v), so f = 1 / SNR (eps), 1 / (1 + SNR) (v), 1 (x0). Infinite for eps at SNR = 0.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "x0":
        return torch.ones_like(snr)
    return 1.0 / (snr + 1.0) if prediction_type == "v" else 1.0 / snr


def loss_space_weight(snr: Tensor, prediction_type: PredictionType, loss_space: PredictionType) -> Tensor:
    """Weight on the `prediction_type` loss that makes it the MSE of the implied `loss_space` quantity."""
    weight = x0_error_factor(snr, prediction_type) / x0_error_factor(snr, loss_space)
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"the {loss_space} error of an {prediction_type}-prediction is unbounded at SNR 0 (zero terminal SNR)"
        )
    return weight


def sample_noise(x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise like x0, plus optional offset noise (a per-channel constant).

    Offset noise (Guttenberg 2023) lets the model change an image's mean brightness, which
    i.i.d. per-pixel noise almost never destroys at the training SNRs.
    """
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise > 0:
        shift = torch.randn(x0.shape[:2], generator=generator, device=x0.device, dtype=x0.dtype)
        noise = noise + offset_noise * shift[..., None, None]
    return noise


@dataclass(frozen=True)
class DiffusionObjective:
    """The simplified DDPM loss, E_t,eps || target - f(x_t, t) ||^2 with t ~ U{0..T-1} (Ho et al. 2020, Eq. 14).

    prediction_type: what the network outputs (``eps``, ``v`` or ``x0``).
    min_snr_gamma: if set, weight each sample by the min-SNR-gamma rule (5.0 in the paper).
    offset_noise: scale of the per-channel offset added to the noise (0.05-0.1 is usual; 0 = off).
    timestep_power: p in t = floor(T u^(1/p)), u ~ U[0, 1): t / T has density p s^(p - 1), so p = 1 is
        the uniform draw and p > 1 spends more of the training on high noise (p = 2: density rising
        linearly from 0 at t = 0 to twice the uniform one at t = T). Same as weighting the loss by
        p (t/T)^(p-1), but without wasting steps on samples that weigh almost nothing.
    loss_space: if set (``eps``, ``v`` or ``x0``), the loss is the MSE of that quantity as implied by the
        prediction, whatever the network outputs: e.g. ``prediction_type="v", loss_space="x0"`` keeps
        v's skip from x_t to x0 (x0_hat = alpha x_t - sigma v_hat, the network need not copy fine detail
        at low noise) with the x0 loss's weighting over t (sigma^2 = 1 / (1 + SNR) on the v error).
    """

    prediction_type: PredictionType = "eps"
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    timestep_power: float = 1.0
    loss_space: PredictionType | None = None

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if self.timestep_power <= 0:
            raise ValueError(f"timestep_power must be positive, got {self.timestep_power}")
        if self.loss_space is not None:
            check_prediction_type(self.loss_space)
            if self.min_snr_gamma is not None:
                raise ValueError("min_snr_gamma and loss_space are two loss weightings: set one of them")

    def sample_timesteps(
        self, schedule: NoiseSchedule, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """t in {0, ..., T-1}, shape (B,): uniform, or biased to high noise by `timestep_power`."""
        T = schedule.num_timesteps
        if self.timestep_power == 1.0:
            return torch.randint(0, T, (batch_size,), device=device, generator=generator)
        u = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
        return (T * u.pow(1.0 / self.timestep_power)).long().clamp(max=T - 1)

    def noised_inputs(self, schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, target) for a batch of clean latents x0 (B, C, H, W) at timesteps t (B,)."""
        alpha = schedule.alpha(t, x0.ndim, like=x0)
        sigma = schedule.sigma(t, x0.ndim, like=x0)
        x_t = add_noise(x0, noise, alpha, sigma)
        return x_t, training_target(self.prediction_type, x0, noise, alpha, sigma)

    def weights(self, schedule: NoiseSchedule, t: Tensor) -> Tensor | None:
        """Per-sample loss weights (B,), or None for the unweighted loss."""
        other_space = self.loss_space not in (None, self.prediction_type)
        if not other_space and self.min_snr_gamma is None:
            return None
        snr = schedule.snr(t).to(torch.float32)
        if other_space:
            return loss_space_weight(snr, self.prediction_type, self.loss_space)
        return min_snr_weight(snr, self.min_snr_gamma, self.prediction_type)

    def loss(self, prediction: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
        """Mean over the batch of (weighted) per-sample mean squared errors, computed in float32."""
        per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, target.ndim)))
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.device)
        return per_sample.mean()
