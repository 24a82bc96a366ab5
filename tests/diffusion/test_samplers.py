"""Every sampler against problems with known answers.

Data x_0 ~ N(mu, s^2 I) has the closed-form denoiser
    E[x_0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)
and a linear probability-flow ODE, whose solution from x_T keeps the standardised value
(x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant.
"""

import pytest
import torch

from ldm.diffusion.denoiser import ClassifierFreeGuidance, Denoiser
from ldm.diffusion.parameterization import predict_eps, training_target
from ldm.diffusion.samplers import (
    PerSampleNoise,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_plms,
)
from ldm.diffusion.schedules import NoiseSchedule, scaled_linear_betas
from ldm.diffusion.timesteps import sampling_timesteps

MU, S = 0.5, 0.3
SCHEDULE = NoiseSchedule.from_betas(scaled_linear_betas())
ZSNR = NoiseSchedule.from_betas(scaled_linear_betas(), zero_terminal_snr=True)
STOCHASTIC = {
    "ddpm": sample_ddpm,
    "ddim_eta1": lambda *a, **k: sample_ddim(*a, eta=1.0, **k),
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
DETERMINISTIC = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "plms": sample_plms,
}
ALL = {**STOCHASTIC, **DETERMINISTIC}


def gaussian_x0(schedule, x, t):
    alpha, sigma = schedule.alpha(t, like=x), schedule.sigma(t, like=x)
    return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)


class GaussianNetwork:
    """A 'network' that outputs the exact eps / v / x0 of Gaussian data."""

    def __init__(self, schedule, prediction_type):
        self.schedule, self.prediction_type = schedule, prediction_type

    def __call__(self, x, t):
        t = int(t)
        x0 = gaussian_x0(self.schedule, x, t)
        alpha, sigma = self.schedule.alpha(t, like=x), self.schedule.sigma(t, like=x)
        eps = (x - alpha * x0) / sigma
        return training_target(self.prediction_type, x0, eps, alpha, sigma)


def prior_sample(schedule, t, n, seed=0):
    alpha, sigma = schedule.alpha(t).item(), schedule.sigma(t).item()
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return alpha * MU + (alpha**2 * S**2 + sigma**2) ** 0.5 * z


MOMENT_CASES = [(name, "eps") for name in ALL] + [
    ("ddim", "v"),
    ("ddim", "x0"),
    ("dpmpp_2m", "v"),
    ("ddpm", "x0"),
    ("plms", "v"),
    ("plms", "x0"),
]


@pytest.mark.parametrize("name, prediction_type", MOMENT_CASES)
def test_samplers_reproduce_data_moments(name, prediction_type):
    # With every training step visited the samplers must recover mu and s. (Coarser grids are
    # biased: e.g. DDPM's posterior variance ignores the uncertainty of x0 and under-disperses.)
    sampler = ALL[name]
    timesteps = sampling_timesteps(1000, 1000)
    x = prior_sample(SCHEDULE, timesteps[0], 10_000)
    denoise = Denoiser(GaussianNetwork(SCHEDULE, prediction_type), SCHEDULE, prediction_type)
    torch.manual_seed(0)
    x0 = sampler(denoise, x, timesteps, SCHEDULE)
    assert x0.mean().item() == pytest.approx(MU, abs=0.01)
    assert x0.std().item() == pytest.approx(S, rel=0.03)


def ode_then_denoise(x_T, t_start):
    """The exact probability-flow ODE from t_start down to t = 0, then the exact denoiser at t = 0
    (every grid that includes t = 0 ends with that same denoising jump)."""
    alpha, sigma = SCHEDULE.alpha(t_start).item(), SCHEDULE.sigma(t_start).item()
    z = (x_T - alpha * MU) / (alpha**2 * S**2 + sigma**2) ** 0.5
    alpha0, sigma0 = SCHEDULE.alpha(0).item(), SCHEDULE.sigma(0).item()
    return gaussian_x0(SCHEDULE, alpha0 * MU + (alpha0**2 * S**2 + sigma0**2) ** 0.5 * z, 0)


def ode_error(sampler, steps):
    timesteps = sampling_timesteps(1000, steps, "linspace")
    x_T = prior_sample(SCHEDULE, timesteps[0], 512)
    x0 = sampler(Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps"), x_T, timesteps, SCHEDULE)
    return (x0 - ode_then_denoise(x_T, timesteps[0])).abs().max().item()


# PLMS takes its last step into the clean sample with the multistep eps (as diffusers and CompVis do),
# not the denoising jump this reference ends with: that step alone leaves ~0.002 at 1000 steps.
@pytest.mark.parametrize(
    "name, tolerance", [("ddim", 0.01), ("euler", 0.01), ("heun", 0.002), ("dpmpp_2m", 0.002), ("plms", 0.003)]
)
def test_deterministic_samplers_converge_to_ode_solution(name, tolerance):
    errors = [ode_error(DETERMINISTIC[name], steps) for steps in (25, 100, 1000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < tolerance


@pytest.mark.parametrize("second_order", [sample_dpmpp_2m, sample_heun, sample_plms])
def test_second_order_samplers_beat_first_order(second_order):
    for steps in (25, 100, 1000):
        assert ode_error(second_order, steps) < ode_error(sample_ddim, steps)


def test_euler_is_ddim_in_other_coordinates():
    timesteps = sampling_timesteps(1000, 12, "karras", SCHEDULE)
    x = prior_sample(SCHEDULE, timesteps[0], 64)
    denoise = Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps")
    assert torch.allclose(sample_euler(denoise, x, timesteps, SCHEDULE), sample_ddim(denoise, x, timesteps, SCHEDULE))


def test_dpmpp_2m_sde_without_noise_is_deterministic_and_accurate():
    timesteps = sampling_timesteps(1000, 200, "linspace")
    x_T = prior_sample(SCHEDULE, timesteps[0], 256)
    denoise = Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps")
    x0 = sample_dpmpp_2m_sde(denoise, x_T, timesteps, SCHEDULE, eta=0.0)
    assert (x0 - ode_then_denoise(x_T, timesteps[0])).abs().max() < 0.02


@pytest.mark.parametrize("name", [*STOCHASTIC, "ddim", "dpmpp_2m", "plms"])
def test_zero_terminal_snr_with_v_prediction(name):
    # At zero terminal SNR x_T ~ N(0, I) is exactly the prior, and eps-to-x0 conversions would divide by 0.
    sampler = ALL[name]
    timesteps = sampling_timesteps(1000, 1000)
    x = torch.randn(10_000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise = Denoiser(GaussianNetwork(ZSNR, "v"), ZSNR, "v")
    torch.manual_seed(0)
    x0 = sampler(denoise, x, timesteps, ZSNR)
    assert torch.isfinite(x0).all()
    assert x0.mean().item() == pytest.approx(MU, abs=0.01)
    assert x0.std().item() == pytest.approx(S, rel=0.03)


def test_zero_terminal_snr_few_steps_stay_finite():
    timesteps = sampling_timesteps(1000, 4)
    x = torch.randn(16, 1, 2, 2, dtype=torch.float64)
    for sampler in ALL.values():
        assert torch.isfinite(sampler(Denoiser(GaussianNetwork(ZSNR, "v"), ZSNR, "v"), x, timesteps, ZSNR)).all()


def test_ddpm_equals_ddim_eta_one_pathwise():
    timesteps = sampling_timesteps(1000, 25)
    x = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise = Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps")
    a = sample_ddpm(denoise, x, timesteps, SCHEDULE, noise_sampler=PerSampleNoise(list(range(8))))
    b = sample_ddim(denoise, x, timesteps, SCHEDULE, eta=1.0, noise_sampler=PerSampleNoise(list(range(8))))
    assert torch.allclose(a, b, atol=1e-10)


def _toy_network(x, t, context):
    # a smooth nonlinear function of (x, t, context) standing in for a trained U-Net
    return torch.tanh(0.7 * x + 0.001 * t.view(-1, 1, 1, 1).to(x.dtype)) + 0.1 * context.mean(dim=(1, 2)).view(
        -1, 1, 1, 1
    )


def test_ddim_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    reference.set_timesteps(20)
    context = torch.randn(2, 5, 3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = x.clone()
    for t in reference.timesteps:
        out = _toy_network(expected, torch.full((2,), int(t)), context)
        expected = reference.step(out, t, expected).prev_sample
    ours = sample_ddim(
        Denoiser(lambda x, t: _toy_network(x, torch.full((2,), t), context), SCHEDULE, "eps"),
        x,
        sampling_timesteps(1000, 20),
        SCHEDULE,
    )
    assert torch.allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("prediction_type, theirs", [("eps", "epsilon"), ("v", "v_prediction")])
def test_dpmpp_2m_matches_diffusers(prediction_type, theirs):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=theirs,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
        euler_at_final=False,
    )
    reference.set_timesteps(15)
    context = torch.randn(2, 5, 3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = x.clone()
    for t in reference.timesteps:
        out = _toy_network(expected, torch.full((2,), int(t)), context)
        expected = reference.step(out, t, expected).prev_sample
    assert sampling_timesteps(1000, 15).tolist() == reference.timesteps.tolist()
    ours = sample_dpmpp_2m(
        Denoiser(lambda x, t: _toy_network(x, torch.full((2,), t), context), SCHEDULE, prediction_type),
        x,
        sampling_timesteps(1000, 15),
        SCHEDULE,
    )
    assert torch.allclose(ours, expected, atol=1e-4)


def test_per_sample_noise_is_independent_of_batch_composition():
    like = torch.zeros(3, 4, 2, 2)
    together = PerSampleNoise([7, 8, 9])(like)
    alone = PerSampleNoise([8])(like[:1])
    assert torch.equal(together[1], alone[0])
    with pytest.raises(ValueError, match="seeds"):
        PerSampleNoise([1, 2])(like)


def test_classifier_free_guidance_combines_outputs():
    def network(x, t, context):
        return x * 0 + context[:, :1, :1].unsqueeze(-1)  # output = the context's first value

    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    x = torch.zeros(2, 1, 2, 2)
    guided = ClassifierFreeGuidance(network, cond, uncond, scale=3.0)(x, 10)
    assert torch.allclose(guided, torch.full_like(x, -1.0 + 3.0 * (2.0 + 1.0)))
    assert torch.allclose(ClassifierFreeGuidance(network, cond, uncond, scale=1.0)(x, 10), torch.full_like(x, 2.0))


def test_guidance_interval_guides_inside_it_and_runs_the_conditional_model_alone_outside():
    batches = []

    def network(x, t, context):
        batches.append(len(x))
        return x * 0 + context[:, :1, :1].unsqueeze(-1)

    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    x = torch.zeros(2, 1, 2, 2)
    guidance = ClassifierFreeGuidance(network, cond, uncond, scale=3.0, interval=(100, 500))
    for t in (100, 500):
        assert torch.allclose(guidance(x, t), torch.full_like(x, -1.0 + 3.0 * (2.0 + 1.0)))
    for t in (99, 501):
        assert torch.allclose(guidance(x, t), torch.full_like(x, 2.0))
    assert batches == [4, 4, 2, 2]  # one pass of B outside: the unconditional half is not computed
    with pytest.raises(ValueError, match="0 <= t_min <= t_max"):
        ClassifierFreeGuidance(network, cond, uncond, scale=3.0, interval=(500, 100))


def test_guidance_rescale_matches_conditional_std():
    def network(x, t, context):
        return x * context[:, :1, :1].unsqueeze(-1)

    x = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.full((2, 1, 1), 1.0), torch.full((2, 1, 1), 0.5)
    fully = ClassifierFreeGuidance(network, cond, uncond, scale=5.0, guidance_rescale=1.0)(x, 0)
    assert torch.allclose(fully.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), rtol=1e-5)


def test_eps_from_exact_x0_is_consistent():
    x = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    alpha, sigma = SCHEDULE.alpha(500, like=x), SCHEDULE.sigma(500, like=x)
    x0 = gaussian_x0(SCHEDULE, x, 500)
    eps = (x - alpha * x0) / sigma
    assert torch.allclose(predict_eps("x0", x0, x, alpha, sigma), eps)


def _exact_ode(schedule, x_T, t_start, t):
    """The probability-flow ODE's solution at t from x_T at t_start: the standardised value is kept."""
    alpha, sigma = schedule.alpha(t_start).item(), schedule.sigma(t_start).item()
    z = (x_T - alpha * MU) / (alpha**2 * S**2 + sigma**2) ** 0.5
    alpha, sigma = schedule.alpha(t).item(), schedule.sigma(t).item()
    return alpha * MU + (alpha**2 * S**2 + sigma**2) ** 0.5 * z


def _order(sampler, schedule, step_counts, t_end=199):
    """Fitted slope of -log(error) against log(steps) on even grids from T-1 to t_end, the error taken
    where the sampler lands on t_end (before the jump to the clean sample)."""
    errors = []
    for steps in step_counts:
        timesteps = torch.arange(999, t_end - 1, -((999 - t_end) // steps))
        assert len(timesteps) == steps + 1
        x_T = prior_sample(schedule, timesteps[0], 256)
        landed = {}
        sampler(
            Denoiser(GaussianNetwork(schedule, "eps"), schedule, "eps"),
            x_T,
            timesteps,
            schedule,
            callback=lambda i, t, x, x0: landed.setdefault(i, x),
        )
        errors.append((landed[steps - 1] - _exact_ode(schedule, x_T, timesteps[0], t_end)).abs().max().item())
    log_n, log_e = torch.tensor(step_counts, dtype=torch.float64).log(), torch.tensor(errors).log()
    return -(((log_n - log_n.mean()) * (log_e - log_e.mean())).sum() / ((log_n - log_n.mean()) ** 2).sum()).item()


def _linear_noise_level_schedule():
    """A schedule whose noise level s / a = 0.02 + 0.005 t is linear in the timestep."""
    abar = 1 / (1 + (0.02 + 0.005 * torch.arange(1000, dtype=torch.float64)) ** 2)
    return NoiseSchedule(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))


def test_plms_is_fourth_order_where_the_grid_is_even_in_noise_level():
    # The transfer is a DDIM step, i.e. Euler in s / a; the Adams-Bashforth weights assume steps even in
    # the variable integrated over, which this schedule makes true: order 4 (DDIM: 1).
    schedule = _linear_noise_level_schedule()
    assert _order(sample_plms, schedule, [25, 50, 100, 200]) > 3.5
    assert _order(sample_ddim, schedule, [25, 50, 100, 200]) == pytest.approx(1.0, abs=0.1)


def test_plms_is_second_order_on_sd_schedule_and_beats_dpmpp_2m():
    # On SD's schedule even steps in t are uneven in s / a, which caps the order at 2 (as for CompVis'
    # PLMS and diffusers' PNDM, which this matches), with a smaller error than DPM-Solver++(2M).
    assert _order(sample_plms, SCHEDULE, [50, 100, 200]) == pytest.approx(2.0, abs=0.25)
    for steps in (25, 50, 100):
        assert _order_free_error(sample_plms, steps) < _order_free_error(sample_dpmpp_2m, steps)


def _order_free_error(sampler, steps):
    timesteps = torch.arange(999, 198, -(800 // steps))
    x_T = prior_sample(SCHEDULE, timesteps[0], 256)
    landed = {}
    sampler(
        Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps"),
        x_T,
        timesteps,
        SCHEDULE,
        callback=lambda i, t, x, x0: landed.setdefault(i, x),
    )
    return (landed[steps - 1] - _exact_ode(SCHEDULE, x_T, timesteps[0], 199)).abs().max().item()


class CountingDenoiser(Denoiser):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(t)
        return super().__call__(x, t)


@pytest.mark.parametrize(
    "spacing, steps", [("leading", 50), ("trailing", 20), ("trailing", 8), ("leading", 2), ("trailing", 1)]
)
def test_plms_matches_diffusers_pndm_without_prk(spacing, steps):
    # diffusers' PNDM steps to t - T // steps, so the grids agree where steps divides T; its leading grid
    # is ours with steps_offset 0, and set_alpha_to_one makes its last step land on the clean sample.
    # eps-prediction only: for v, diffusers combines the raw v outputs of different steps and converts
    # the mix to eps with the current step's alpha, where we combine eps (the quantity PNDM extrapolates).
    prediction_type = "eps"
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.PNDMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        skip_prk_steps=True,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
        steps_offset=0,
    )
    reference.set_timesteps(steps)
    network = GaussianNetwork(SCHEDULE, prediction_type)
    timesteps = sampling_timesteps(1000, steps, spacing)
    x = prior_sample(SCHEDULE, timesteps[0], 32).float().repeat(1, 2, 3, 3)
    expected = x.clone()
    for t in reference.timesteps:
        expected = reference.step(network(expected, int(t)), t, expected).prev_sample
    denoise = CountingDenoiser(network, SCHEDULE, prediction_type)
    ours = sample_plms(denoise, x, timesteps, SCHEDULE)
    assert denoise.calls == reference.timesteps.tolist()  # the same calls, the second timestep twice
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_plms_warm_up_orders():
    # The first step is redone from x_T with the mean of the eps at x_T and at the predicted x_n (the
    # eps at the prediction is then dropped); the second combines the eps of x_n and x_T as AB2.
    timesteps = torch.tensor([900, 600])
    seen = []

    def denoise(x, t):
        seen.append((t, x.clone()))
        return 0.5 * x  # x0 estimate; eps follows from it

    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = sample_plms(denoise, x, timesteps, SCHEDULE)
    (a_t, a_n), (s_t, s_n) = SCHEDULE.alpha(timesteps).tolist(), SCHEDULE.sigma(timesteps).tolist()
    eps_t = (x - a_t * 0.5 * x) / s_t
    x_pred = a_n * 0.5 * x + s_n * eps_t
    eps_pred = (x_pred - a_n * 0.5 * x_pred) / s_n
    eps_mean = 0.5 * (eps_t + eps_pred)
    x_n = a_n * (x - s_t * eps_mean) / a_t + s_n * eps_mean
    assert [t for t, _ in seen] == [900, 600, 600]
    torch.testing.assert_close(seen[1][1], x_pred)
    torch.testing.assert_close(seen[2][1], x_n)
    eps_n = (x_n - a_n * 0.5 * x_n) / s_n
    combined = 1.5 * eps_n - 0.5 * eps_t  # second order Adams-Bashforth into the clean sample
    torch.testing.assert_close(out, (x_n - s_n * combined) / a_n)


@pytest.mark.parametrize("name", ALL)
def test_a_tensor_the_callback_returns_replaces_the_state(name):
    # the contract inpainting's latent blending relies on: every sampler continues from what the callback returns
    timesteps = sampling_timesteps(1000, 6)
    x = prior_sample(SCHEDULE, timesteps[0], 8)
    denoise = Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps")
    seen = []

    def keep(i, t, x, x0):
        seen.append((i, t))  # returns None: the state is left alone

    plain = ALL[name](denoise, x, timesteps, SCHEDULE, noise_sampler=PerSampleNoise(list(range(8))))
    kept = ALL[name](denoise, x, timesteps, SCHEDULE, noise_sampler=PerSampleNoise(list(range(8))), callback=keep)
    assert torch.equal(plain, kept) and seen == list(enumerate(timesteps.tolist()))
    last = len(timesteps) - 1
    replaced = ALL[name](
        denoise, x, timesteps, SCHEDULE, callback=lambda i, t, x, x0: torch.full_like(x, 7.0) if i == last else None
    )
    assert torch.equal(replaced, torch.full_like(x, 7.0))
    # a replaced intermediate state changes where the sampler goes from there
    shifted = ALL[name](
        denoise,
        x,
        timesteps,
        SCHEDULE,
        noise_sampler=PerSampleNoise(list(range(8))),
        callback=lambda i, t, x, x0: x + 1.0 if i == 2 else None,
    )
    assert not torch.allclose(shifted, plain)
