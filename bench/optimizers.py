"""What Muon costs a toy training step: MuonAdamW against fused AdamW, same U-Net, same inputs.

    python bench/optimizers.py [--batch 32] [--repeats 7] [--steps 5]

Builds the toy U-Net (`configs/model/toy.yaml`, channels_last as `experiment=toy` trains it), then
times, alternately in one process, whole steps (forward, backward, optimizer step) and the optimizer
step alone for each optimizer; prints medians and the ratio to AdamW (these machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.training.optimizers import MuonAdamW

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def toy_unet() -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=toy"])
    return instantiate(cfg.model.unet).to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = toy_unet()
    optimizers = {
        "AdamW (fused)": torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True),
        "MuonAdamW": MuonAdamW(unet.parameters(), lr=1e-4, fused=True),
    }
    x = torch.randn(args.batch, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    timesteps = torch.randint(0, 1000, (args.batch,))
    context = torch.randn(args.batch, 77, 64)

    def backward() -> None:
        unet(x, timesteps, context).sub(x).pow(2).mean().backward()

    steps = {name: [] for name in optimizers}
    updates = {name: [] for name in optimizers}
    for optimizer in optimizers.values():  # warm up, and create each optimizer's state
        for _ in range(2):
            backward()
            optimizer.step()
            optimizer.zero_grad()
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                backward()
                optimizer.step()
                optimizer.zero_grad()
            steps[name].append((time.perf_counter() - start) / args.steps)
            backward()
            start = time.perf_counter()
            optimizer.step()
            updates[name].append(time.perf_counter() - start)
            optimizer.zero_grad()

    matrices = sum(p.ndim >= 2 for p in unet.parameters())
    print(
        f"toy U-Net, batch {args.batch}, {matrices} matrices / filters of {len(list(unet.parameters()))} "
        f"parameters, medians of {args.repeats} repeats"
    )
    reference = statistics.median(steps["AdamW (fused)"])
    for name in optimizers:
        step, update = statistics.median(steps[name]), statistics.median(updates[name])
        print(f"{name:14s} step {1e3 * step:6.1f} ms ({step / reference:.2f}x)   optimizer.step {1e3 * update:5.1f} ms")


if __name__ == "__main__":
    main()
