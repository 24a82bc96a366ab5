import math

import pytest
import torch

from ldm.diffusion.schedules import (
    NoiseSchedule,
    ScheduleSpec,
    cosine_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    shift_snr,
)
from ldm.diffusion.timesteps import sampling_timesteps

diffusers = pytest.importorskip("diffusers")


def test_scaled_linear_matches_closed_form():
    betas = scaled_linear_betas()
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    # betas are linear in sqrt space: constant first difference of sqrt(beta)
    diffs = betas.sqrt().diff()
    assert torch.allclose(diffs, diffs[0].expand_as(diffs), rtol=0, atol=1e-15)
    # abar at t = T-1 of Stable Diffusion's schedule (0.0047, SNR ~ 0.0047 at the last step)
    abar = NoiseSchedule.from_betas(betas).alphas_cumprod
    assert abar[-1].item() == pytest.approx(0.0046601, abs=1e-6)
    assert abar[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)


def test_linear_is_not_scaled_linear():
    assert not torch.allclose(linear_betas(1000, 0.00085, 0.012), scaled_linear_betas(1000, 0.00085, 0.012))


def test_cosine_matches_definition():
    T, s = 1000, 0.008
    abar = NoiseSchedule.from_betas(cosine_betas(T, s)).alphas_cumprod
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        # abar(t) here is the value after step t, i.e. f(t+1)/f(0) (betas clipped only near T)
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: linear_betas(1000, 1e-4, 0.02), dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        (lambda: scaled_linear_betas(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (lambda: cosine_betas(), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_match_diffusers(ours, theirs, zero_snr):
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=zero_snr, **theirs)
    schedule = NoiseSchedule.from_betas(ours(), zero_terminal_snr=zero_snr)
    assert torch.allclose(schedule.alphas_cumprod, reference.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)


def test_zero_terminal_snr_rescaling():
    original = NoiseSchedule.from_betas(scaled_linear_betas())
    rescaled = NoiseSchedule.from_betas(scaled_linear_betas(), zero_terminal_snr=True)
    assert rescaled.zero_terminal_snr and not original.zero_terminal_snr
    assert rescaled.snr(torch.tensor(999)).item() == 0.0
    assert rescaled.alpha(torch.tensor(0)).item() == pytest.approx(original.alpha(torch.tensor(0)).item(), rel=1e-12)
    # SNR stays strictly decreasing
    snr = rescaled.snr(torch.arange(1000))
    assert (snr.diff() < 0).all()
    assert torch.equal(rescale_zero_terminal_snr(scaled_linear_betas())[-1], torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("factor", [0.25, 4.0])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_snr_shift_scales_every_snr(factor, zero_snr):
    base = NoiseSchedule.from_betas(scaled_linear_betas(), zero_terminal_snr=zero_snr)
    shifted = NoiseSchedule.from_betas(scaled_linear_betas(), zero_terminal_snr=zero_snr, snr_shift=factor)
    t = torch.arange(999)
    assert torch.allclose(shifted.snr(t), factor * base.snr(t), rtol=1e-9, atol=0)
    assert shifted.zero_terminal_snr == zero_snr  # a zero SNR stays zero
    assert (shifted.snr(t).diff() < 0).all()


def test_snr_shift_of_one_is_identity_and_bad_factors_fail():
    betas = scaled_linear_betas()
    assert torch.equal(NoiseSchedule.from_betas(betas, snr_shift=1.0).betas, betas)
    assert torch.allclose(shift_snr(betas, 1.0), betas, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="snr_shift must be positive"):
        shift_snr(betas, 0.0)


def test_lookups_broadcast_and_cast():
    schedule = NoiseSchedule.from_betas(scaled_linear_betas())
    x = torch.zeros(3, 4, 8, 8, dtype=torch.float16)
    t = torch.tensor([0, 500, 999])
    alpha = schedule.alpha(t, x.ndim, like=x)
    sigma = schedule.sigma(t, x.ndim, like=x)
    assert alpha.shape == (3, 1, 1, 1) and alpha.dtype == torch.float16
    assert torch.allclose(
        alpha.double() ** 2 + sigma.double() ** 2, torch.ones(3, 1, 1, 1, dtype=torch.float64), atol=2e-3
    )
    snr = schedule.snr(t)
    assert torch.allclose(snr, schedule.alpha(t) ** 2 / schedule.sigma(t) ** 2)


def test_invalid_betas_rejected():
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        NoiseSchedule(torch.tensor([0.1, 1.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "spacing, expected",
    [
        ("trailing", [999, 799, 599, 399, 199]),
        ("leading", [800, 600, 400, 200, 0]),
        ("linspace", [999, 749, 500, 250, 0]),
    ],
)
def test_sampling_timesteps(spacing, expected):
    assert sampling_timesteps(1000, 5, spacing).tolist() == expected


def test_sampling_timesteps_match_diffusers_trailing():
    reference = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    reference.set_timesteps(20)
    assert sampling_timesteps(1000, 20, "trailing").tolist() == reference.timesteps.tolist()


def test_sampling_timesteps_rejects_bad_input():
    with pytest.raises(ValueError):
        sampling_timesteps(1000, 0)
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(1000, 10, "karras-ish")


@pytest.mark.parametrize(
    "kind, function", [("scaled_linear", scaled_linear_betas), ("linear", linear_betas), ("cosine", cosine_betas)]
)
@pytest.mark.parametrize("zero_snr, shift", [(False, 1.0), (True, 1.0), (False, 4.0)])
def test_a_spec_builds_the_schedule_its_fields_describe(kind, function, zero_snr, shift):
    spec = ScheduleSpec(kind, 1000, zero_terminal_snr=zero_snr, snr_shift=shift)
    expected = NoiseSchedule.from_betas(function(1000), zero_terminal_snr=zero_snr, snr_shift=shift)
    built = spec.build()
    assert torch.equal(built.betas, expected.betas) and built.spec == spec
    assert ScheduleSpec.from_dict(spec.to_dict()) == spec  # what checkpoints store reads back the same
    assert torch.equal(NoiseSchedule.from_spec(**spec.to_dict()).betas, expected.betas)  # the configs' target


def test_a_spec_spells_out_its_defaults_and_refuses_what_its_kind_does_not_take():
    assert ScheduleSpec("linear").to_dict() == dict(
        kind="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, zero_terminal_snr=False, snr_shift=1.0
    )
    assert "beta_start" not in ScheduleSpec("cosine").to_dict()
    with pytest.raises(ValueError, match="takes no offset"):
        ScheduleSpec("scaled_linear", offset=0.1)
    with pytest.raises(ValueError, match="kind must be one of"):
        ScheduleSpec("sigmoid")
    with pytest.raises(ValueError, match="unknown schedule key"):
        ScheduleSpec.from_dict({"kind": "linear", "betas": [0.1]})
