"""Image-to-image (SDEdit): the strength's grid against diffusers' img2img convention, and sampling from a noised input."""

import pytest
import torch
from test_samplers import ALL, MU, SCHEDULE, ZSNR, GaussianNetwork, S

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.img2img import check_strength, noised_start, strength_timesteps
from ldm.diffusion.timesteps import sampling_timesteps


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few thousand numbers: a second thread only adds synchronisation (10x slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
@pytest.mark.parametrize("strength", [0.0, 0.05, 0.3, 0.6, 0.75, 0.999, 1.0])
def test_the_strength_picks_the_grid_tail_that_diffusers_img2img_runs(spacing, steps, strength):
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing, steps_offset=0
    )
    scheduler.set_timesteps(steps)
    pipeline = SimpleNamespace(scheduler=scheduler)  # get_timesteps reads only the scheduler
    expected, count = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(pipeline, steps, strength, "cpu")
    ours = strength_timesteps(scheduler.timesteps, strength)
    assert ours.tolist() == expected.tolist() and len(ours) == count
    if steps > 1 or spacing != "linspace":  # (a 1-step linspace grid: diffusers' is [0], ours [999])
        assert sampling_timesteps(1000, steps, spacing).tolist() == scheduler.timesteps.tolist()


def test_strength_examples_and_checks():
    grid = sampling_timesteps(1000, 20)  # trailing: 999, 949, ..., 49
    assert strength_timesteps(grid, 0.6).tolist() == grid[8:].tolist() and int(strength_timesteps(grid, 0.6)[0]) == 599
    assert strength_timesteps(grid, 1.0).tolist() == grid.tolist()
    assert len(strength_timesteps(grid, 0.0)) == 0 and len(strength_timesteps(grid, 0.04)) == 0  # int(0.8) = 0 steps
    for bad in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="strength must be a number in"):
            check_strength(bad)


def test_the_start_is_the_input_noised_to_the_first_timestep_pure_noise_at_strength_one_and_the_input_at_zero():
    z0, eps = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    grid = sampling_timesteps(1000, 20)
    tail = strength_timesteps(grid, 0.5)
    a, s = SCHEDULE.alpha(int(tail[0])).item(), SCHEDULE.sigma(int(tail[0])).item()
    torch.testing.assert_close(noised_start(z0, eps, tail, False, SCHEDULE), a * z0 + s * eps, rtol=0, atol=1e-15)
    assert noised_start(z0, eps, grid, True, SCHEDULE) is eps  # text-to-image's start, bit for bit
    assert noised_start(z0, eps, grid[:0], False, SCHEDULE) is z0
    # at zero terminal SNR the noised input at t = T - 1 is the noise itself: both conventions agree
    assert torch.equal(noised_start(z0, eps, grid, False, ZSNR), eps)


@pytest.mark.parametrize("name", ALL)
def test_sampling_from_a_noised_data_sample_reproduces_the_data(name):
    # SDEdit's premise: x_t = alpha_t x_0 + sigma_t eps with x_0 ~ data has exactly the marginal at t, so
    # every sampler run from there on the grid's tail must recover the data distribution.
    grid = sampling_timesteps(1000, 1000)  # every step: coarser grids bias stochastic samplers (test_samplers)
    tail = strength_timesteps(grid, 0.4)
    generator = torch.Generator().manual_seed(0)
    z0 = MU + S * torch.randn(4000, 1, 1, 1, generator=generator, dtype=torch.float64)
    x = noised_start(z0, torch.randn(z0.shape, generator=generator, dtype=torch.float64), tail, False, SCHEDULE)
    torch.manual_seed(0)
    out = ALL[name](Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps"), x, tail, SCHEDULE)
    assert out.mean().item() == pytest.approx(MU, abs=0.015)  # 3 standard errors
    assert out.std().item() == pytest.approx(S, rel=0.04)
