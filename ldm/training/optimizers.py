"""Muon for the U-Net's weight matrices and convolution filters, AdamW for everything else.

Muon (Jordan et al. 2024) replaces each weight's momentum update by its nearest semi-orthogonal
matrix (five Newton-Schulz iterations), so every direction of the update moves at the same rate.
``torch.optim.Muon`` takes 2-D parameters only and orthogonalises in bfloat16, which CPUs without
bf16 units emulate slowly; here convolution filters (out, in, kh, kw) are orthogonalised as the
(out, in * kh * kw) matrices they apply, in float32. Updates are scaled to the RMS of a typical
AdamW update (0.2 sqrt(max(rows, cols)), Liu et al. 2025), so one learning rate and schedule serve
both kinds of parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import AdamW, Optimizer

# the quintic iteration's coefficients, tuned for a steep slope at zero (Jordan et al. 2024)
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(updates: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately semi-orthogonal matrices with the row and column spaces of ``updates`` (..., m, n)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = updates.shape[-2] > updates.shape[-1]
    x = updates.mT if tall else updates
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class MuonAdamW(Optimizer):
    """Muon on every parameter of two or more dimensions, AdamW (torch's, fused) on the rest.

    ``lr`` and ``weight_decay`` apply to both; schedulers scale both groups alike.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ):
        params = list(params)
        matrices = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]
        if others and not matrices:
            raise ValueError(
                "MuonAdamW got no parameter of two or more dimensions (flat shards of FSDP or "
                "DeepSpeed?): Muon needs whole matrices; use optim=adamw_cosine with sharded strategies"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        groups = [{"params": matrices, "muon": True}] if matrices else []
        groups += [{"params": others, "muon": False}] if others else []
        super().__init__(groups, defaults)
        self._adamw = None
        if others:
            self._adamw = AdamW(others, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:  # schedulers and users set the rate on this optimiser's groups: pass it on
                self._adamw.param_groups[0].update(lr=group["lr"], weight_decay=group["weight_decay"])
                self._adamw.step()
        return loss

    def _muon_step(self, group: dict) -> None:
        """Momentum, then one batched orthogonalisation per distinct matrix shape (CPUs pay per call)."""
        lr, momentum = group["lr"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        buffers = [self._momentum_buffer(p) for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for param, update in zip(params, updates):
            by_shape.setdefault((param.shape[0], param[0].numel()), []).append((param, update))
        for (rows, cols), pairs in by_shape.items():
            matrices = torch.stack([update.reshape(rows, cols) for _, update in pairs]).float()
            orthogonal = orthogonalize(matrices, group["ns_steps"]).to(pairs[0][0].dtype).unbind()
            steps = [o.view(param.shape) for (param, _), o in zip(pairs, orthogonal)]
            torch._foreach_add_([param for param, _ in pairs], steps, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    def _momentum_buffer(self, param: Tensor) -> Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        return state["momentum_buffer"]

    def state_dict(self):
        state = super().state_dict()
        state["adamw"] = self._adamw.state_dict() if self._adamw is not None else None
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        adamw_state = state_dict.pop("adamw")
        if self._adamw is not None:
            self._adamw.load_state_dict(adamw_state)
        super().load_state_dict(state_dict)
