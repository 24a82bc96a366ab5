"""Noise schedules of the discrete-time forward process (Ho et al. 2020).

Notation, shared by every module in ``ldm.diffusion``:

    beta_t          variance added at step t, t = 0 .. T-1
    abar_t          prod_{s <= t} (1 - beta_s), the signal fraction left at step t
    alpha_t         sqrt(abar_t), the signal scale:   x_t = alpha_t x_0 + sigma_t eps
    sigma_t         sqrt(1 - abar_t), the noise scale
    snr_t           alpha_t^2 / sigma_t^2

A schedule is a plain vector of betas; the ``*_betas`` functions build them and
``NoiseSchedule`` derives everything else in float64 so that quantities such as
``1 - abar_t`` near t = 0 keep their precision.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas linear in t (Ho et al. 2020, Sec. 4). Not SD's schedule: see ``scaled_linear_betas``."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Betas linear in sqrt(beta): Stable Diffusion's schedule.

    The original LDM code calls this "linear"; diffusers calls it "scaled_linear".
    """
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Betas of the cosine schedule, abar(t) = cos^2(pi/2 (t/T + s) / (1 + s)) (Nichol & Dhariwal 2021, Eq. 17).

    Betas are clipped at ``max_beta`` to avoid the singularity at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = 1 - abar[1:] / abar[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the last step has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    The result needs v- or x0-prediction: at SNR 0 an eps-prediction carries no information about x_0.
    """
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def shift_snr(betas: Tensor, factor: float) -> Tensor:
    """Betas whose SNR at every step is `factor` times that of `betas` (logSNR + log(factor)).

    The resolution shift of Hoogeboom et al. 2023 ("simple diffusion") and Esser et al. 2024 (SD3):
    a schedule made for one resolution destroys the image sooner at a lower one (fewer pixels carry
    the same content), so a model on 16x16 latents is better served by a schedule made for 64x64
    ones with its SNRs times (64 / 16)^2 = 16. Zero terminal SNR stays zero.
    """
    if factor <= 0:
        raise ValueError(f"snr_shift must be positive, got {factor}")
    abar = torch.cumprod(1 - betas.to(torch.float64), dim=0)
    shifted = factor * abar / (1 + (factor - 1) * abar)  # abar / (1 - abar) scaled by factor
    previous = torch.cat([shifted.new_ones(1), shifted[:-1]])
    return 1 - shifted / previous


BETA_FUNCTIONS = {"scaled_linear": scaled_linear_betas, "linear": linear_betas, "cosine": cosine_betas}
# the arguments each beta function takes besides num_timesteps
BETA_ARGUMENTS = {
    "scaled_linear": ("beta_start", "beta_end"),
    "linear": ("beta_start", "beta_end"),
    "cosine": ("offset", "max_beta"),
}


@dataclass(frozen=True)
class ScheduleSpec:
    """A training schedule as plain data: the beta function by name (``kind``) with its arguments,
    then the SNR options. The one description of a schedule: ``configs/schedule/*.yaml`` build a
    ``NoiseSchedule`` through it, and checkpoints, SD single files' metadata and diffusers scheduler
    configs are written from and read into it (``to_dict`` / ``from_dict``).

    An argument left None is set to the beta function's default; ``zero_terminal_snr`` rescales the betas
    (Lin et al. 2023), then ``snr_shift`` multiplies every step's SNR (Hoogeboom et al. 2023).
    """

    kind: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    offset: float | None = None
    max_beta: float | None = None
    zero_terminal_snr: bool = False
    snr_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in BETA_FUNCTIONS:
            raise ValueError(f"schedule kind must be one of {', '.join(BETA_FUNCTIONS)}, got {self.kind!r}")
        if not isinstance(self.num_timesteps, int) or isinstance(self.num_timesteps, bool) or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {self.num_timesteps!r}")
        foreign = [
            name
            for name in ("beta_start", "beta_end", "offset", "max_beta")
            if getattr(self, name) is not None and name not in BETA_ARGUMENTS[self.kind]
        ]
        if foreign:
            raise ValueError(f"the {self.kind} schedule takes no {', '.join(foreign)}")
        defaults = inspect.signature(BETA_FUNCTIONS[self.kind]).parameters
        for name in BETA_ARGUMENTS[self.kind]:  # spelled out, so a stored spec never depends on our defaults
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name].default)

    def betas(self) -> Tensor:
        """(T,) float64 betas of ``kind`` before the SNR options."""
        arguments = {name: getattr(self, name) for name in BETA_ARGUMENTS[self.kind]}
        return BETA_FUNCTIONS[self.kind](num_timesteps=self.num_timesteps, **arguments)

    def build(self) -> NoiseSchedule:
        """The ``NoiseSchedule`` this spec describes (it keeps the spec, for checkpoints)."""
        schedule = NoiseSchedule.from_betas(self.betas(), self.zero_terminal_snr, self.snr_shift)
        return NoiseSchedule(schedule.betas, spec=self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the arguments the kind does not take omitted)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScheduleSpec:
        """The spec of ``to_dict``'s output (unknown keys are an error)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown schedule key(s) {', '.join(map(str, unknown))}")
        return cls(**values)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving noise schedule over ``num_timesteps`` steps (float64, CPU).

    Lookups (``alpha``, ``sigma``, ``snr``) take integer timesteps of any shape and return
    tensors broadcastable against a batch of images: (B,) -> (B, 1, 1, 1) with ``ndim=4``.
    """

    betas: Tensor  # (T,)
    spec: ScheduleSpec | None = None  # what it was built from, when it was built from a spec

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or len(self.betas) < 2:
            raise ValueError(f"betas must be a vector of at least 2 steps, got shape {tuple(self.betas.shape)}")
        if not bool(((self.betas > 0) & (self.betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")

    @classmethod
    def from_betas(cls, betas: Tensor, zero_terminal_snr: bool = False, snr_shift: float = 1.0) -> NoiseSchedule:
        """Build from betas, optionally rescaled to zero terminal SNR, then with every SNR times `snr_shift`."""
        betas = betas.to(torch.float64)
        betas = rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas
        return cls(shift_snr(betas, snr_shift) if snr_shift != 1.0 else betas)

    @classmethod
    def from_spec(cls, **spec: Any) -> NoiseSchedule:
        """Build from ``ScheduleSpec`` fields (the ``_target_`` of ``configs/schedule/*.yaml``)."""
        return ScheduleSpec(**spec).build()

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t, shape (T,)."""
        return torch.cumprod(1 - self.betas, dim=0)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def _gather(self, values: Tensor, t: Tensor, ndim: int, like: Tensor | None) -> Tensor:
        out = values[torch.as_tensor(t, device="cpu").long()]
        out = out.reshape(out.shape + (1,) * (ndim - out.ndim)) if ndim > out.ndim else out
        if like is not None:
            out = out.to(device=like.device, dtype=like.dtype)
        return out

    def alpha(self, t: Tensor, ndim: int = 1, like: Tensor | None = None) -> Tensor:
        """sqrt(abar_t): the signal scale of x_t."""
        return self._gather(self.alphas_cumprod.sqrt(), t, ndim, like)

    def sigma(self, t: Tensor, ndim: int = 1, like: Tensor | None = None) -> Tensor:
        """sqrt(1 - abar_t): the noise scale of x_t."""
        return self._gather((1 - self.alphas_cumprod).sqrt(), t, ndim, like)

    def snr(self, t: Tensor, ndim: int = 1, like: Tensor | None = None) -> Tensor:
        """abar_t / (1 - abar_t); exactly 0 at the last step of a zero-terminal-SNR schedule."""
        abar = self.alphas_cumprod
        return self._gather(abar / (1 - abar), t, ndim, like)
