"""U-Net training step (forward + backward) time: ours vs diffusers' UNet2DConditionModel, same weights.

    python bench/unet_step.py [--config small|sd15|sd21] [--batch 8] [--size 32] [--repeats 7]
        [--device cpu|cuda] [--dtype fp32|bf16] [--channels-last] [--checkpointing]

Both networks get identical weights (ours exported with ldm.formats.diffusers_layout) and inputs, and
are timed alternately in the same process (medians; the ratio is the figure to read, since these
machines are noisy). On a GPU it also prints images/s and model-FLOPs utilisation of ours.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from presets import network_configs  # bench/presets.py: the sizes of configs/model/*.yaml

from ldm.formats.diffusers_layout import unet_diffusers_config, unet_to_diffusers
from ldm.models.unet import UNetModel

CONFIGS = {
    "small": dict(network_configs("sd15")["unet"], model_channels=64, num_heads=4, context_dim=256),
    "sd15": network_configs("sd15")["unet"],
    "sd21": network_configs("sd21_base")["unet"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def step_time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent side (64 = 512 px images)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="time ours only (no diffusers needed)")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = dict(CONFIGS[args.config], gradient_checkpointing=args.checkpointing)
    torch.manual_seed(0)
    ours = UNetModel(**config).to(device)
    nets = {"ldm": ours}
    if not args.no_reference:
        import diffusers

        reference = diffusers.UNet2DConditionModel(**unet_diffusers_config(config, args.size))
        reference.load_state_dict(unet_to_diffusers(ours.state_dict(), config), strict=True)
        if args.checkpointing:
            reference.enable_gradient_checkpointing()
        nets["diffusers"] = reference.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for net in nets.values():
        net.to(memory_format=memory_format).train()

    x = torch.randn(args.batch, 4, args.size, args.size, device=device).contiguous(memory_format=memory_format)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    context = torch.randn(args.batch, 77, config["context_dim"], device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(name: str) -> None:
        net = nets[name]
        with autocast:
            out = net(x, t, context) if name == "ldm" else net(x, t, encoder_hidden_states=context).sample
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in nets}
    for name in nets:  # warm-up (allocator, kernels, oneDNN primitives)
        run(name), run(name)
    for _ in range(args.repeats):
        for name in nets:  # alternate, so drifting machine load hits both alike
            times[name].append(step_time(lambda: run(name), device))

    params = sum(p.numel() for p in ours.parameters())
    print(
        f"U-Net {args.config}: {params / 1e6:.1f}M params, batch {args.batch}, latents {args.size}x{args.size}, "
        f"{args.dtype}, {device}{', channels_last' if args.channels_last else ''}"
    )
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        print(
            f"  {name:<10} {median * 1000:9.1f} ms/step  {args.batch / median:8.1f} samples/s  (min {min(times[name]) * 1000:.1f})"
        )
    if "diffusers" in medians:
        print(f"  ratio diffusers/ldm: {medians['diffusers'] / medians['ldm']:.3f} (> 1: ours is faster)")
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            run("ldm")
        flops = counter.get_total_flops()
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        achieved = flops / medians["ldm"] / 1e12
        mfu = f", MFU {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s" if peak and dtype == torch.bfloat16 else ""
        print(f"  {flops / 1e12:.2f} TFLOP per step, {achieved:.1f} TFLOP/s achieved{mfu} ({name})")
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
