import pytest
import torch

from ldm.diffusion.parameterization import (
    add_noise,
    eps_from_x0,
    predict_eps,
    predict_x0,
    training_target,
    velocity,
)
from ldm.diffusion.schedules import NoiseSchedule, scaled_linear_betas

SCHEDULE = NoiseSchedule.from_betas(scaled_linear_betas())
ZSNR = NoiseSchedule.from_betas(scaled_linear_betas(), zero_terminal_snr=True)


def _batch(schedule, t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor(t)
    alpha, sigma = schedule.alpha(t, 4), schedule.sigma(t, 4)
    return x0, eps, alpha, sigma, add_noise(x0, eps, alpha, sigma)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_exact_target_recovers_x0_and_eps(prediction_type):
    x0, eps, alpha, sigma, x_t = _batch(SCHEDULE, [0, 1, 250, 500, 999])
    target = training_target(prediction_type, x0, eps, alpha, sigma)
    assert torch.allclose(predict_x0(prediction_type, target, x_t, alpha, sigma), x0, atol=1e-9)
    assert torch.allclose(predict_eps(prediction_type, target, x_t, alpha, sigma), eps, atol=1e-9)


def test_v_identities():
    x0, eps, alpha, sigma, x_t = _batch(SCHEDULE, [3, 400, 998])
    v = velocity(x0, eps, alpha, sigma)
    assert torch.allclose(v, alpha * eps - sigma * x0)
    # (x_t, v) is a rotation of (x0, eps) by the angle phi with alpha = cos(phi), sigma = sin(phi)
    assert torch.allclose(x_t**2 + v**2, x0**2 + eps**2, atol=1e-9)
    assert torch.allclose(alpha * x_t - sigma * v, x0, atol=1e-12)
    assert torch.allclose(sigma * x_t + alpha * v, eps, atol=1e-12)


def test_v_prediction_is_finite_at_zero_terminal_snr():
    x0, eps, alpha, sigma, x_t = _batch(ZSNR, [999, 999])
    assert torch.all(alpha == 0)
    v = velocity(x0, eps, alpha, sigma)
    assert torch.allclose(v, -x0)
    assert torch.allclose(predict_x0("v", v, x_t, alpha, sigma), x0)
    assert torch.allclose(eps_from_x0(x0, x_t, alpha, sigma), eps)


def test_add_noise_has_forward_process_moments():
    t = torch.tensor([600])
    alpha, sigma = SCHEDULE.alpha(t, 2), SCHEDULE.sigma(t, 2)
    x0 = torch.full((1, 200_000), 2.0, dtype=torch.float64)
    eps = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t = add_noise(x0, eps, alpha, sigma)
    assert x_t.mean().item() == pytest.approx(2.0 * alpha.item(), abs=0.01)
    assert x_t.var().item() == pytest.approx(sigma.item() ** 2, rel=0.01)


def test_matches_diffusers_add_noise_and_velocity():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, eps, alpha, sigma, x_t = _batch(SCHEDULE, [0, 100, 999])
    t = torch.tensor([0, 100, 999])
    assert torch.allclose(reference.add_noise(x0.float(), eps.float(), t).double(), x_t, atol=1e-5)
    assert torch.allclose(
        reference.get_velocity(x0.float(), eps.float(), t).double(), velocity(x0, eps, alpha, sigma), atol=1e-5
    )
