"""Which of the T training timesteps a sampler visits (the discretisation), apart from the stepping."""

from __future__ import annotations

import torch
from torch import Tensor

SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")


def sampling_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing") -> Tensor:
    """Descending integer timesteps for a sampler taking ``num_steps`` steps, shape (num_steps,).

    trailing  T-1, T-1-T/n, ...: starts at the last training step, so the sampler begins from the
              prior the model was trained on (Lin et al. 2023, Table 2); the default.
    leading   (n-1)T/n, ..., T/n, 0 plus no offset: the original DDIM/SD grid; never visits t = T-1.
    linspace  round(linspace(T-1, 0, n)): both ends included.
    """
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
