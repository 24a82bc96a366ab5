"""Classifier guidance against analytic classifiers on the Gaussian problem of test_samplers."""

import pytest
import torch
from test_samplers import MU, SCHEDULE, ZSNR, GaussianNetwork, S, prior_sample

from ldm.diffusion.classifier_guidance import ClassifierGuidance, ClassLogLikelihood, log_likelihood_gradient
from ldm.diffusion.denoiser import ClassifierFreeGuidance, Denoiser
from ldm.diffusion.parameterization import predict_eps
from ldm.diffusion.samplers import sample_plms
from ldm.diffusion.timesteps import sampling_timesteps

W = torch.tensor([0.7, -1.3], dtype=torch.float64).view(1, 2, 1, 1)


def linear_log_likelihood(x, timesteps):
    """log p(y | x_t) = <W, x_t> + const: its gradient is W everywhere."""
    return (W * x).sum(dim=(1, 2, 3)) + 3.0


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("t", [0, 400, 999])
def test_shift_is_minus_scale_sigma_gradient_in_eps(prediction_type, t):
    network = GaussianNetwork(SCHEDULE, prediction_type)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    guided = ClassifierGuidance(network, linear_log_likelihood, 2.5, SCHEDULE, prediction_type)(x, t)
    alpha, sigma = SCHEDULE.alpha(t).item(), SCHEDULE.sigma(t).item()
    eps = predict_eps(prediction_type, network(x, t), x, alpha, sigma)
    eps_guided = predict_eps(prediction_type, guided, x, alpha, sigma)
    torch.testing.assert_close(eps_guided - eps, (-2.5 * sigma * W).expand_as(x), rtol=1e-9, atol=1e-9)


def test_scale_zero_and_zero_terminal_snr_leave_the_model_alone():
    network = GaussianNetwork(ZSNR, "v")
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert torch.equal(ClassifierGuidance(network, linear_log_likelihood, 0.0, ZSNR, "v")(x, 500), network(x, 500))
    assert torch.equal(ClassifierGuidance(network, linear_log_likelihood, 3.0, ZSNR, "v")(x, 999), network(x, 999))


def test_gradient_is_taken_inside_no_grad():
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        gradient = log_likelihood_gradient(lambda x, t: (x**2).sum(dim=(1, 2, 3)) * (t == 7), x, 7)
    torch.testing.assert_close(gradient, 2 * x)


def tilted_log_likelihood(c):
    """log p(y | x_t) for data N(MU, S^2) and p(y | x_0) proportional to exp(c x_0): x_0 | x_t is Gaussian with mean
    m(x_t) = MU + a S^2 / (a^2 S^2 + s^2) (x_t - a MU), so log E[exp(c x_0) | x_t] = c m(x_t) + const."""

    def log_likelihood(x, timesteps):
        alpha, sigma = SCHEDULE.alpha(timesteps, 4, like=x), SCHEDULE.sigma(timesteps, 4, like=x)
        mean = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
        return (c * mean).sum(dim=(1, 2, 3))

    return log_likelihood


@pytest.mark.parametrize("sampler, steps, scale", [(sample_plms, 50, 1.0), (sample_plms, 50, 2.0)])
def test_guided_sampling_draws_from_the_tilted_distribution(sampler, steps, scale):
    # p(x_0) p(y | x_0)^scale with p(y | x_0) ~ exp(c x_0) is N(MU + scale c S^2, S^2): guidance with the exact
    # noisy likelihood samples it, through the probability-flow ODE of p(x_t | y).
    c = 2.0
    timesteps = sampling_timesteps(1000, steps, "leading")
    x = prior_sample(SCHEDULE, timesteps[0], 2000)  # the tilt moves the prior by only alpha_T c S^2 ~ 0.01
    model_fn = ClassifierGuidance(GaussianNetwork(SCHEDULE, "eps"), tilted_log_likelihood(c), scale, SCHEDULE, "eps")
    x0 = sampler(Denoiser(model_fn, SCHEDULE, "eps"), x, timesteps, SCHEDULE)
    assert x0.mean().item() == pytest.approx(MU + scale * c * S**2, abs=0.01)  # unguided: MU
    assert x0.std().item() == pytest.approx(S, rel=0.04)


def test_composes_with_classifier_free_guidance():
    def network(x, t, context):
        return 0.5 * x + context[:, :1, :1].unsqueeze(-1)

    cond, uncond = torch.full((2, 3, 4), 2.0, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    cfg = ClassifierFreeGuidance(network, cond, uncond, scale=3.0)
    both = ClassifierGuidance(cfg, linear_log_likelihood, 1.5, SCHEDULE, "eps")(x, 300)
    torch.testing.assert_close(both, cfg(x, 300) - 1.5 * SCHEDULE.sigma(300).item() * W.expand_as(x))


class FixedLogits(torch.nn.Module):
    heads_classes = {"colour": 3, "shape": 2}

    def forward(self, x, timesteps):
        base = x.mean(dim=(1, 2, 3))[:, None]
        return {"colour": torch.cat([base, 2 * base, -base], 1), "shape": torch.cat([base, 0 * base], 1)}


def test_class_log_likelihood_adds_the_labelled_heads_only():
    x = torch.randn(3, 1, 2, 2)
    labels = {"colour": torch.tensor([1, -1, 2]), "shape": torch.tensor([0, 1, -1])}
    logits = FixedLogits()(x, None)
    expected = torch.stack(
        [
            logits["colour"][0].log_softmax(-1)[1] + logits["shape"][0].log_softmax(-1)[0],
            logits["shape"][1].log_softmax(-1)[1],
            logits["colour"][2].log_softmax(-1)[2],
        ]
    )
    torch.testing.assert_close(ClassLogLikelihood(FixedLogits(), labels)(x, torch.zeros(3)), expected)
    with pytest.raises(ValueError, match="no head"):
        ClassLogLikelihood(FixedLogits(), {"position": torch.tensor([0])})
