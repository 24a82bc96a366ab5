"""Which of the T training timesteps a sampler visits (the discretisation), apart from the stepping."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule

SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace", "karras")


def sampling_timesteps(
    num_timesteps: int, num_steps: int, spacing: str = "trailing", schedule: NoiseSchedule | None = None
) -> Tensor:
    """Descending integer timesteps for a sampler taking ``num_steps`` steps, shape (num_steps,).

    trailing  T-1, T-1-T/n, ...: starts at the last training step, so the sampler begins from the
              prior the model was trained on (Lin et al. 2023, Table 2); the default.
    leading   (n-1)T/n, ..., T/n, 0 plus no offset: the original DDIM/SD grid; never visits t = T-1.
    linspace  round(linspace(T-1, 0, n)): both ends included.
    karras    noise levels s = sigma/alpha spaced as in Karras et al. 2022, Eq. 5 (rho = 7) between the
              schedule's extremes, each mapped to the training step of nearest log s (duplicates
              dropped, so a few fewer steps may result); needs ``schedule``. At zero terminal SNR
              the grid starts at T-1 and spaces the rest from T-2.
    """
    if spacing == "karras":
        if schedule is None:
            raise ValueError("karras spacing needs the noise schedule")
        return karras_timesteps(schedule, num_steps)
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if spacing == "trailing":
        steps = torch.arange(num_timesteps, 0, -num_timesteps / num_steps, dtype=torch.float64).round() - 1
    elif spacing == "leading":
        steps = torch.arange(num_steps - 1, -1, -1, dtype=torch.float64) * (num_timesteps // num_steps)
    elif spacing == "linspace":
        steps = torch.linspace(num_timesteps - 1, 0, num_steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return steps.long()


def karras_timesteps(schedule: NoiseSchedule, num_steps: int, rho: float = 7.0) -> Tensor:
    """Descending training timesteps nearest (in log noise level) to Karras et al.'s rho-spacing."""
    abar = schedule.alphas_cumprod
    log_s = 0.5 * ((1 - abar).log() - abar.log())  # log(sigma / alpha) per step, increasing in t
    first = schedule.num_timesteps - 1
    zero_snr = bool(abar[-1] == 0)
    top = first - 1 if zero_snr else first
    count = num_steps - 1 if zero_snr else num_steps
    s_max, s_min = log_s[top].exp().item(), log_s[0].exp().item()
    ramp = torch.linspace(0, 1, max(count, 1), dtype=torch.float64)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    nearest = (sigmas.log()[:, None] - log_s[None, : top + 1]).abs().argmin(dim=1)
    steps = torch.unique_consecutive(nearest)
    if zero_snr:
        steps = torch.cat([torch.tensor([first]), steps])
    return steps.long()
