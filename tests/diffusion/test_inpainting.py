"""Inpainting by latent blending and RePaint resampling, against a correlated Gaussian whose conditional is known."""

import pytest
import torch
from test_samplers import ALL, MU, SCHEDULE, GaussianNetwork, S

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.inpainting import LatentBlending, latent_mask, network_calls
from ldm.diffusion.samplers import PerSampleNoise, sample_ddim, sample_ddpm
from ldm.diffusion.timesteps import sampling_timesteps


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few thousand numbers: a second thread only adds synchronisation (10x slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Two pixels (u, v) ~ N(MU, S^2 [[1, RHO], [RHO, 1]]): keep u = C, repaint v; v | u = C ~ N(MU + RHO (C - MU), S^2 (1 - RHO^2)).
RHO, C = 0.9, MU + 2 * S
TRUE_MEAN, TRUE_STD = MU + RHO * (C - MU), S * (1 - RHO**2) ** 0.5
ROTATION = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / 2**0.5  # the covariance's eigenvectors
VARIANCES = torch.tensor([S**2 * (1 + RHO), S**2 * (1 - RHO)], dtype=torch.float64)


def correlated_x0(x, t):
    """E[x_0 | x_t] for the two-pixel Gaussian: the scalar Gaussian denoiser along each eigenvector."""
    alpha, sigma = SCHEDULE.alpha(t).item(), SCHEDULE.sigma(t).item()
    mean = ROTATION @ torch.tensor([MU, MU], dtype=torch.float64)
    y = x.reshape(-1, 2) @ ROTATION.T  # (B, 2) in the eigenbasis
    y0 = mean + alpha * VARIANCES / (alpha**2 * VARIANCES + sigma**2) * (y - alpha * mean)
    return (y0 @ ROTATION).reshape(x.shape)


def inpaint(sampler, steps, resample_steps=1, jump_length=1, n=2000, known_noise=None):
    torch.manual_seed(0)
    grid = sampling_timesteps(1000, steps)
    known = torch.full((n, 1, 1, 2), C, dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)  # keep u, repaint v
    eps = torch.randn(n, 1, 1, 2, dtype=torch.float64)
    blend = LatentBlending(
        known,
        mask,
        grid,
        SCHEDULE,
        known_noise,
        resample_steps=resample_steps,
        jump_length=jump_length,
        denoise=correlated_x0,
    )
    out = sampler(correlated_x0, blend.start(eps, eps), grid, SCHEDULE, callback=blend)
    assert torch.equal(out[..., 0], known[..., 0])  # the known pixel is the input, bit for bit
    return out[..., 1].mean().item(), out[..., 1].std().item()


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_ddim])
def test_repaint_resampling_moves_the_repainted_region_towards_the_true_conditional(sampler):
    mean, std = inpaint(sampler, 50)
    assert TRUE_MEAN - mean > 0.2  # blending alone under-conditions: 0.82 (DDPM) / 0.77 (DDIM) against 1.04
    resampled_mean, resampled_std = inpaint(sampler, 50, resample_steps=10)
    assert abs(resampled_mean - TRUE_MEAN) < 0.65 * abs(mean - TRUE_MEAN)  # 0.91 / 0.90
    assert abs(resampled_std - TRUE_STD) < abs(std - TRUE_STD)


def test_fresh_known_noise_gets_the_spread_closer_than_reusing_the_starting_noise():
    # diffusers' convention (the starting noise at every step) stands in through a noise sampler that repeats it
    fresh_std = inpaint(sample_ddpm, 50)[1]
    repeated = torch.randn(2000, 1, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    repeated_std = inpaint(sample_ddpm, 50, known_noise=lambda like: repeated)[1]
    assert fresh_std / TRUE_STD < 1.25 < 1.3 < repeated_std / TRUE_STD  # measured: 1.18 and 1.40


@pytest.mark.parametrize("name", ALL)
def test_every_sampler_keeps_the_known_region_and_changes_the_repainted_one(name):
    grid = sampling_timesteps(1000, 8)
    known = torch.full((64, 1, 1, 2), -3.0, dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
    blend = LatentBlending(known, mask, grid, SCHEDULE)
    torch.manual_seed(0)
    eps = torch.randn(64, 1, 1, 2, dtype=torch.float64)
    denoise = Denoiser(GaussianNetwork(SCHEDULE, "eps"), SCHEDULE, "eps")
    out = ALL[name](denoise, blend.start(eps, eps), grid, SCHEDULE, callback=blend)
    assert torch.equal(out[..., 0], known[..., 0])
    assert torch.isfinite(out).all() and out[..., 1].mean().item() == pytest.approx(MU, abs=0.15)  # the data's, not -3


def test_resampling_is_reproducible_per_image_and_counts_its_network_calls():
    grid = sampling_timesteps(1000, 12)
    calls = []

    def denoise(x, t):
        calls.append(t)
        return correlated_x0(x, t)

    def run(seeds):
        calls.clear()
        noise = PerSampleNoise(seeds)
        known = torch.full((len(seeds), 1, 1, 2), C, dtype=torch.float64)
        mask = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
        blend = LatentBlending(known, mask, grid, SCHEDULE, noise, resample_steps=3, jump_length=4, denoise=denoise)
        eps = noise(known)
        return sample_ddpm(denoise, blend.start(eps, eps), grid, SCHEDULE, noise_sampler=noise, callback=blend)

    both = run([5, 6])
    assert len(calls) == network_calls(12, 3, 4) == 12 + 2 * 2 * 4  # jumps after steps 4 and 8, not from the end
    assert calls[:4] + calls[4:8] == grid[:4].tolist() + grid[:4].tolist()  # step 4 lands, jumps back to grid[0]
    torch.testing.assert_close(run([6])[0], both[1], rtol=0, atol=1e-12)  # an image's draws are its own


def test_the_mask_reaches_the_latent_grid_by_max_pooling():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 0, 0] = 1.0  # one pixel of the first 4x4 block
    mask[..., 5:, 5:] = 0.4  # below the half-way threshold: kept
    assert latent_mask(mask, (2, 2)).tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]
    assert torch.equal(latent_mask(mask, (8, 8)), (mask >= 0.5).float())
    with pytest.raises(ValueError, match="does not tile"):
        latent_mask(mask, (3, 3))
