"""Self-conditioning at sampling time: the network reads its own previous x0 estimate."""

import pytest
import torch

from ldm.diffusion.denoiser import ClassifierFreeGuidance, Denoiser, SelfConditioned, sampling_network
from ldm.diffusion.parameterization import predict_x0
from ldm.diffusion.samplers import sample_dpmpp_2m
from ldm.diffusion.schedules import NoiseSchedule, scaled_linear_betas
from ldm.diffusion.timesteps import sampling_timesteps

SCHEDULE = NoiseSchedule.from_betas(scaled_linear_betas(), zero_terminal_snr=True)


class RecordingNetwork:
    """v-prediction network whose output depends on its x0 estimate; records every estimate it is fed."""

    self_conditioning = True

    def __init__(self):
        self.estimates = []

    def __call__(self, x, timesteps, context, x0_estimate=None):
        self.estimates.append(None if x0_estimate is None else x0_estimate.clone())
        shift = 0.0 if x0_estimate is None else 0.5 * x0_estimate
        return 0.3 * x + shift + context[:, :1, :1].unsqueeze(-1)


def test_first_call_gets_no_estimate_then_each_call_the_x0_of_the_last_output():
    network = RecordingNetwork()
    wrapped = SelfConditioned(network, SCHEDULE, "v")
    x, context = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 8)
    outputs = []
    for t, x_t in [(999, x), (600, 0.9 * x), (200, 0.5 * x)]:
        timesteps = torch.full((2,), t)
        outputs.append((x_t, timesteps, wrapped(x_t, timesteps, context)))
    assert network.estimates[0] is None
    for (x_t, timesteps, output), fed in zip(outputs, network.estimates[1:]):
        alpha, sigma = SCHEDULE.alpha(timesteps, 4, like=x_t), SCHEDULE.sigma(timesteps, 4, like=x_t)
        torch.testing.assert_close(fed, predict_x0("v", output, x_t, alpha, sigma))


def test_guided_branches_each_read_their_own_estimate():
    network = RecordingNetwork()
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    guided = ClassifierFreeGuidance(SelfConditioned(network, SCHEDULE, "x0"), cond, uncond, scale=3.0)
    x = torch.zeros(2, 1, 2, 2)
    guided(x, 500)
    guided(x, 400)
    # x0-prediction: the estimate is the output itself, -1 for the unconditional rows, 2 for the conditional
    assert torch.equal(network.estimates[1], torch.cat([torch.full((2, 1, 2, 2), -1.0), torch.full((2, 1, 2, 2), 2.0)]))


def test_a_new_batch_shape_needs_a_new_wrapper():
    wrapped = SelfConditioned(RecordingNetwork(), SCHEDULE, "x0")
    context = torch.zeros(2, 1, 1)
    wrapped(torch.zeros(2, 1, 2, 2), torch.full((2,), 10), context)
    with pytest.raises(ValueError, match="new SelfConditioned"):
        wrapped(torch.zeros(4, 1, 2, 2), torch.full((4,), 10), torch.zeros(4, 1, 1))


def test_sampling_network_wraps_only_self_conditioning_networks():
    plain = lambda x, t, context: x  # noqa: E731
    assert sampling_network(plain, SCHEDULE, "x0") is plain
    first, second = (sampling_network(RecordingNetwork(), SCHEDULE, "x0") for _ in range(2))
    assert isinstance(first, SelfConditioned) and first is not second


def test_sampling_runs_from_fresh_wrappers_are_identical():
    network = RecordingNetwork()
    context = torch.randn(2, 5, 8)
    timesteps = sampling_timesteps(1000, 8, "trailing", SCHEDULE)
    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def run():
        model_fn = ClassifierFreeGuidance(
            sampling_network(network, SCHEDULE, "v"), context, torch.zeros_like(context), 2.0
        )
        return sample_dpmpp_2m(Denoiser(model_fn, SCHEDULE, "v"), x_T, timesteps, SCHEDULE)

    first = run()
    assert torch.equal(run(), first)
    assert sum(e is None for e in network.estimates) == 2  # one first step per run
