"""U-Net training step, eager vs torch.compile (what `task.compile_unet=true` buys).

    python bench/compile_unet.py [--batch 16] [--steps 30] [overrides...]

Builds the U-Net of a config (default the toy's; Hydra overrides such as `model=sd15` pick another)
twice with the same weights, times forward + backward + fused AdamW on random latents for the eager
one, the compiled one (`module.compile()`, in place, as the task does), then the eager one again
(machine noise shows as the spread of the two eager figures). Prints the compile time (the first
two steps) and median step times; on a GPU, pass --device cuda.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]


def time_steps(unet: torch.nn.Module, inputs: tuple, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first two steps, median seconds of the next ``steps``)."""
    optimizer = torch.optim.AdamW(unet.parameters(), 1e-4, fused=True)

    def step() -> None:
        unet(*inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device = torch.device(args.device)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    torch.manual_seed(0)
    eager = instantiate(cfg.model.unet).to(device, memory_format=torch.channels_last)
    compiled = instantiate(cfg.model.unet).to(device, memory_format=torch.channels_last)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    size = cfg.data.image_size // instantiate(cfg.model.autoencoder).downsampling_factor
    latents = torch.randn(args.batch, eager.in_channels, size, size, device=device)
    inputs = (
        latents.contiguous(memory_format=torch.channels_last),
        torch.randint(0, 1000, (args.batch,), device=device),
        torch.randn(args.batch, 77, cfg.model.unet.context_dim, device=device),
    )
    results = [
        ("eager", *time_steps(eager, inputs, args.steps, device)),
        ("compiled", *time_steps(compiled, inputs, args.steps, device)),
        ("eager again", *time_steps(eager, inputs, args.steps, device)),
    ]
    print(f"U-Net training step, batch {args.batch}, latents {size}x{size}, {device}")
    for name, first, median in results:
        print(f"  {name:<12} first two steps {first:6.1f} s   median step {median * 1000:8.1f} ms")
    eager_median = statistics.mean([results[0][2], results[2][2]])
    print(f"  speed-up of compile: {eager_median / results[1][2]:.2f}x (against the mean of the eager runs)")


if __name__ == "__main__":
    main()
