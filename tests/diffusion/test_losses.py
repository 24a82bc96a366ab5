import pytest
import torch

from ldm.diffusion.losses import DiffusionObjective, min_snr_weight, sample_noise
from ldm.diffusion.parameterization import add_noise, predict_x0
from ldm.diffusion.schedules import NoiseSchedule, scaled_linear_betas

SCHEDULE = NoiseSchedule.from_betas(scaled_linear_betas())
ZSNR = NoiseSchedule.from_betas(scaled_linear_betas(), zero_terminal_snr=True)


def test_min_snr_weights_per_prediction_type():
    snr = torch.tensor([0.5, 5.0, 20.0])
    gamma = 5.0
    assert torch.allclose(min_snr_weight(snr, gamma, "x0"), torch.tensor([0.5, 5.0, 5.0]))
    assert torch.allclose(min_snr_weight(snr, gamma, "eps"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weight(snr, gamma, "v"), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))


def _noisy_prediction(objective: DiffusionObjective, t: torch.Tensor):
    """(x0, eps, x_t, target, prediction, x0_hat) in float64: a prediction 0.1 off its target, and its x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 2, 4, 4, generator=g, dtype=torch.float64)
    x_t, target = objective.noised_inputs(SCHEDULE, x0, t, eps)
    prediction = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    alpha, sigma = SCHEDULE.alpha(t, 4), SCHEDULE.sigma(t, 4)
    return x0, eps, x_t, target, prediction, predict_x0(objective.prediction_type, prediction, x_t, alpha, sigma)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_min_snr_weighted_losses_agree_in_x0_space(prediction_type):
    # The weighted loss must equal min(SNR, gamma) * ||x0_hat - x0||^2 whatever the network predicts.
    gamma = 5.0
    t = torch.tensor([10, 300, 700, 990])
    objective = DiffusionObjective(prediction_type=prediction_type, min_snr_gamma=gamma)
    x0, _, _, target, prediction, x0_hat = _noisy_prediction(objective, t)
    weighted = objective.weights(SCHEDULE, t).double() * (prediction - target).pow(2).mean(dim=(1, 2, 3))
    x0_space = SCHEDULE.snr(t).clamp(max=gamma) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted, x0_space, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_min_snr_is_finite_at_zero_terminal_snr(prediction_type):
    objective = DiffusionObjective(prediction_type=prediction_type, min_snr_gamma=5.0)
    weights = objective.weights(ZSNR, torch.tensor([0, 999]))
    assert torch.isfinite(weights).all()
    expected_last = {"eps": 1.0, "v": 0.0, "x0": 0.0}[prediction_type]
    assert weights[1].item() == pytest.approx(expected_last)


@pytest.mark.parametrize(
    ("prediction_type", "loss_space"),
    [("v", "x0"), ("v", "eps"), ("x0", "v"), ("x0", "eps"), ("eps", "v"), ("eps", "x0")],
)
def test_loss_space_weight_gives_the_mse_of_the_implied_quantity(prediction_type, loss_space):
    t = torch.tensor([0, 10, 300, 700, 999])
    objective = DiffusionObjective(prediction_type=prediction_type, loss_space=loss_space)
    x0, eps, x_t, target, prediction, x0_hat = _noisy_prediction(objective, t)
    alpha, sigma = SCHEDULE.alpha(t, 4), SCHEDULE.sigma(t, 4)
    implied = {  # the loss_space quantity implied by the prediction, through x0_hat
        "x0": x0_hat,
        "eps": (x_t - alpha * x0_hat) / sigma,
        "v": alpha * (x_t - alpha * x0_hat) / sigma - sigma * x0_hat,
    }[loss_space]
    wanted = {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0}[loss_space]
    weighted = objective.weights(SCHEDULE, t).double() * (prediction - target).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted, (implied - wanted).pow(2).mean(dim=(1, 2, 3)), rtol=1e-6)


def test_loss_space_of_the_prediction_itself_is_unweighted():
    assert DiffusionObjective(prediction_type="v", loss_space="v").weights(SCHEDULE, torch.tensor([5])) is None


def test_v_prediction_with_x0_loss_is_finite_at_zero_terminal_snr():
    # At SNR 0 the v target is -x0: the x0 loss weighs the v error by sigma^2 = 1 there.
    weights = DiffusionObjective(prediction_type="v", loss_space="x0").weights(ZSNR, torch.tensor([0, 999]))
    assert weights[1].item() == pytest.approx(1.0)
    assert 0 < weights[0].item() < 1e-3


def test_x0_loss_of_an_eps_prediction_at_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="unbounded at SNR 0"):
        DiffusionObjective(prediction_type="eps", loss_space="x0").weights(ZSNR, torch.tensor([999]))


def test_unweighted_loss_is_plain_mse():
    objective = DiffusionObjective()
    assert objective.weights(SCHEDULE, torch.tensor([1, 2])) is None
    pred, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    target[1] *= 2
    assert objective.loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert objective.loss(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_noised_inputs_follow_forward_process():
    objective = DiffusionObjective(prediction_type="eps")
    x0 = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 999])
    x_t, target = objective.noised_inputs(SCHEDULE, x0, t, eps)
    alpha, sigma = SCHEDULE.alpha(t, 4, like=x0), SCHEDULE.sigma(t, 4, like=x0)
    assert torch.equal(x_t, add_noise(x0, eps, alpha, sigma))
    assert torch.equal(target, eps)


def test_timesteps_are_uniform_over_all_steps():
    objective = DiffusionObjective()
    t = objective.sample_timesteps(SCHEDULE, 200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.min().item() == 0 and t.max().item() == 999
    counts = torch.bincount(t, minlength=1000).float()
    assert counts.mean().item() == pytest.approx(200.0)
    assert counts.std().item() < 25  # binomial std ~ 14


@pytest.mark.parametrize("power", [2.0, 0.5])
def test_timestep_power_matches_its_closed_form_density(power):
    objective = DiffusionObjective(timestep_power=power)
    t = objective.sample_timesteps(SCHEDULE, 400_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min().item() >= 0 and t.max().item() == 999
    # P(t < k) = (k / T)^p: check it at every tenth of the range
    edges = torch.arange(100, 1001, 100)
    observed = torch.stack([(t < k).double().mean() for k in edges])
    expected = (edges / 1000.0).double() ** power
    assert torch.allclose(observed, expected, atol=3e-3)


def test_offset_noise_adds_per_channel_constant():
    x0 = torch.zeros(4096, 3, 8, 8)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # constant per (sample, channel)
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.5, rel=0.05)


def test_invalid_objective_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionObjective(prediction_type="score")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionObjective(min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="timestep_power"):
        DiffusionObjective(timestep_power=0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionObjective(loss_space="score")
    with pytest.raises(ValueError, match="set one of them"):
        DiffusionObjective(prediction_type="v", loss_space="x0", min_snr_gamma=5.0)
