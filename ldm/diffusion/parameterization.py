"""What the network predicts, and exact conversions between the three choices.

With x_t = alpha x_0 + sigma eps and alpha^2 + sigma^2 = 1 (variance preserving):

    eps  the noise (Ho et al. 2020)
    v    alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4); then x_0 = alpha x_t - sigma v
                                                              and eps = sigma x_t + alpha v
    x0   the clean sample itself

Every function takes alpha and sigma already broadcast against x (see ``NoiseSchedule.alpha``).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

PredictionType = Literal["eps", "v", "x0"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "v", "x0")


def check_prediction_type(prediction_type: str) -> PredictionType:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type  # type: ignore[return-value]


def add_noise(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Sample q(x_t | x_0) = N(alpha x_0, sigma^2 I) by reparameterisation (Ho et al. 2020, Eq. 4)."""
    return alpha * x0 + sigma * noise


def velocity(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x_0 (Salimans & Ho 2022)."""
    return alpha * noise - sigma * x0


def training_target(prediction_type: PredictionType, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of the simplified loss for each prediction type."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        return velocity(x0, noise, alpha, sigma)
    return x0


def predict_x0(prediction_type: PredictionType, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The network's estimate of x_0 from its raw output.

    For eps-prediction this divides by alpha, undefined at zero terminal SNR: such schedules need v or x0.
    """
    if prediction_type == "eps":
        return (x_t - sigma * output) / alpha
    if prediction_type == "v":
        return alpha * x_t - sigma * output
    return output


def predict_eps(prediction_type: PredictionType, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The network's estimate of the noise from its raw output (sigma > 0 for every training step)."""
    if prediction_type == "eps":
        return output
    if prediction_type == "v":
        return sigma * x_t + alpha * output
    return (x_t - alpha * output) / sigma


def eps_from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise implied by an x_0 estimate: eps = (x_t - alpha x_0) / sigma."""
    return (x_t - alpha * x0) / sigma
