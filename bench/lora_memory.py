"""Memory and speed of an SD LoRA training step beside a full fine-tune's, in the same run.

    python bench/lora_memory.py [--config sd15|sd21] [--rank 16] [--targets attention transformer]
        [--text-encoder] [--activations] [--size 64] [--batch 1] [--speed] [--speed-size 32] [--steps 3]
        [--device cpu|cuda]

State (exact, on the meta device, as bench/finetune_memory.py counts it): the U-Net's float32 weights
(frozen under LoRA), what is trained (all of them, or the adapters), their gradients, the optimiser's
state after one real AdamW ``step()``, the EMA copy (of the U-Net, or of the adapters), the frozen VAE
and text encoder.

``--activations``: the bytes autograd keeps for backward in one U-Net training forward at ``--size``
(latent side; 64 = 512 px) and ``--batch``, bf16 autocast, gradient checkpointing on (both presets use
it; ``--no-checkpointing`` without): counted through ``saved_tensors_hooks``, distinct storages, weights
left out (they are state). A frozen layer keeps less: the gradient of its input needs its weight, not
its input. With checkpointing this is what waits for the backward pass; the block being recomputed
adds its own activations on top while it runs.

``--speed``: median seconds of a training forward + backward (``--precision``, checkpointing) at
``--speed-size``, full fine-tune vs LoRA, alternated so that both see the same machine load; the
optimiser step is timed too where its state fits (always for LoRA; for the full fine-tune on a GPU).
On a GPU each also reports the peak ``torch.cuda.max_memory_allocated`` of a whole step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from finetune_memory import (
    GIB,
    MODELS,
    forward_saved_bytes,
    optimizer_state_bytes,
    saved_activation_bytes,
    state_bytes,
    tensor_bytes,
)
from presets import network_configs  # bench/presets.py: the sizes of configs/model/*.yaml

from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm.models.lora import LoRANetwork, LoRASpec
from ldm.models.unet import UNetModel


def lora_state_bytes(config: str, spec: LoRASpec) -> dict[str, int]:
    """Bytes of a LoRA run's state, counted like ``finetune_memory.state_bytes``'s rows."""
    full = state_bytes(config, "adamw", ema=False)
    networks = network_configs(MODELS[config])
    with torch.device("meta"):
        unet = UNetModel(**networks["unet"])
        text = OpenCLIPTextEncoder(**networks["text"])
        network = LoRANetwork.for_training(spec, unet, text)
    adapters = tensor_bytes(network.parameters())
    return {
        "U-Net weights (fp32)": full["U-Net weights (fp32)"],  # frozen, still float32 (bf16-mixed casts per op)
        "trained: adapters (fp32)": adapters,
        "gradients (fp32)": adapters,
        "optimiser state (adamw)": optimizer_state_bytes(network, "adamw"),
        "EMA copy (fp32)": adapters,
        "VAE (frozen, fp32)": full["VAE (frozen, fp32)"],
        "text encoder (frozen, fp32)": full["text encoder (frozen, fp32)"],
        "trained parameters (count)": sum(p.numel() for p in network.parameters()),
    }


def full_rows(config: str) -> dict[str, int]:
    rows = state_bytes(config, "adamw", ema=True)
    return {
        "U-Net weights (fp32)": rows["U-Net weights (fp32)"],
        "trained: adapters (fp32)": 0,
        "gradients (fp32)": rows["U-Net gradients (fp32)"],
        "optimiser state (adamw)": rows["optimiser state (adamw)"],
        "EMA copy (fp32)": rows["EMA copy (fp32)"],
        "VAE (frozen, fp32)": rows["VAE (frozen, fp32)"],
        "text encoder (frozen, fp32)": rows["text encoder (frozen, fp32)"],
        "trained parameters (count)": rows["U-Net parameters (count)"],
    }


def lora_saved_activation_bytes(
    config: str, spec: LoRASpec, size: int, batch: int, checkpointing: bool, device: str
) -> int:
    """``finetune_memory.saved_activation_bytes`` for the U-Net with adapters attached and frozen weights."""
    unet_config = network_configs(MODELS[config])["unet"]
    unet = UNetModel(**dict(unet_config, gradient_checkpointing=checkpointing)).to(device).requires_grad_(False)
    network = LoRANetwork.for_training(spec, unet).to(device)
    network.attach(unet)
    weights = (*unet.parameters(), *network.parameters())
    saved, loss = forward_saved_bytes(unet, unet_config["context_dim"], size, batch, device, weights)
    loss.backward()
    return saved


class Steps:
    """Training steps of one U-Net, as a full fine-tune (all weights trained) or as LoRA (frozen, adapters
    attached): one set of weights serves both, so two SD U-Nets never sit in memory at once."""

    def __init__(self, config: str, spec: LoRASpec, size: int, device: str, full_optimizer: bool, bf16: bool = True):
        unet_config = network_configs(MODELS[config])["unet"]
        self.device = device
        self.bf16 = bf16
        self.unet = UNetModel(**dict(unet_config, gradient_checkpointing=True)).to(device)
        self.network = LoRANetwork.for_training(spec, self.unet).to(device)
        self.adamw_full = None
        if full_optimizer:  # 6.4 GiB of AdamW state for SD 1.5: a GPU's, not a shared CPU's
            self.adamw_full = torch.optim.AdamW(self.unet.parameters(), lr=1e-5)
        self.adamw_lora = torch.optim.AdamW(self.network.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(1, 4, size, size, generator=generator).to(device)
        self.t = torch.tensor([500], device=device)
        self.context = torch.randn(1, 77, unet_config["context_dim"], generator=generator).to(device)

    def step(self, lora: bool) -> tuple[float, int | None]:
        """Seconds of one training step, and the peak GPU memory it reached (None on a CPU)."""
        self.unet.requires_grad_(not lora)
        handles = self.network.attach(self.unet) if lora else []
        trained, optimizer = (self.network, self.adamw_lora) if lora else (self.unet, self.adamw_full)
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.unet(self.x, self.t, self.context).float().pow(2).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for p in trained.parameters():
            p.grad = None
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        return seconds, torch.cuda.max_memory_allocated() if self.device == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["attention", "transformer"])
    parser.add_argument("--text-encoder", action="store_true")
    parser.add_argument(
        "--activations", action="store_true", help="also count one forward's saved tensors (slow on a CPU)"
    )
    parser.add_argument("--size", type=int, default=64, help="latent side for --activations (64 = 512 px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true", help="--activations without gradient checkpointing")
    parser.add_argument("--speed", action="store_true", help="time training steps, full vs LoRA, alternated")
    parser.add_argument("--speed-size", type=int, default=32, help="latent side for --speed (32 = 256 px)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="--speed: bf16 autocast or fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    spec = LoRASpec(rank=args.rank, alpha=args.rank, targets=args.targets, text_encoder=args.text_encoder)

    full, lora = full_rows(args.config), lora_state_bytes(args.config, spec)
    print(
        f"{args.config}: full fine-tune (AdamW + EMA) vs LoRA rank {args.rank} on {'+'.join(args.targets)}"
        f"{' + text encoder' if args.text_encoder else ''} (AdamW + EMA of the adapters)"
    )
    print(f"  {'':<32} {'full':>12} {'LoRA':>12}")
    counts = full.pop("trained parameters (count)"), lora.pop("trained parameters (count)")
    print(f"  {'trained parameters':<32} {counts[0] / 1e6:>11.1f}M {counts[1] / 1e6:>11.2f}M")
    for name in full:
        print(f"  {name:<32} {full[name] / GIB:>8.3f} GiB {lora[name] / GIB:>8.3f} GiB")
    totals = sum(full.values()), sum(lora.values())
    print(f"  {'state in all':<32} {totals[0] / GIB:>8.3f} GiB {totals[1] / GIB:>8.3f} GiB")
    if args.activations:
        checkpointing = not args.no_checkpointing
        saved_full = saved_activation_bytes(args.config, args.size, args.batch, checkpointing, args.device)
        saved_lora = lora_saved_activation_bytes(args.config, spec, args.size, args.batch, checkpointing, args.device)
        print(
            f"  {'saved activations':<32} {saved_full / GIB:>8.3f} GiB {saved_lora / GIB:>8.3f} GiB"
            f"  (batch {args.batch}, latents {args.size}x{args.size}, checkpointing {'on' if checkpointing else 'off'})"
        )
        print(
            f"  {'state + saved activations':<32} {(totals[0] + saved_full) / GIB:>8.3f} GiB "
            f"{(totals[1] + saved_lora) / GIB:>8.3f} GiB"
        )
    if args.speed:
        steps = Steps(args.config, spec, args.speed_size, args.device, args.device == "cuda", args.precision == "bf16")
        timings: dict[str, list[float]] = {"full": [], "lora": []}
        peaks: dict[str, int | None] = {}
        for number in range(args.steps + 1):  # alternated, so both see the same machine load; the first is a warm-up
            for kind in ("full", "lora"):
                seconds, peaks[kind] = steps.step(lora=kind == "lora")
                if number:
                    timings[kind].append(seconds)
        medians = {k: statistics.median(v) for k, v in timings.items()}
        what = (
            "forward + backward + AdamW step"
            if steps.adamw_full is not None
            else "forward + backward; its AdamW step not run here"
        )
        print(
            f"  step at latents {args.speed_size}x{args.speed_size}, batch 1, {args.precision}, checkpointing, "
            f"median of {args.steps} on {args.device}:"
        )
        print(f"    full fine-tune   {medians['full']:8.3f} s  ({what})")
        print(f"    LoRA             {medians['lora']:8.3f} s  (forward + backward + AdamW step)")
        print(f"    ratio full / LoRA {medians['full'] / medians['lora']:6.2f}")
        if args.device == "cuda":
            print(
                f"    peak GPU memory of a step: full {peaks['full'] / GIB:.2f} GiB, LoRA {peaks['lora'] / GIB:.2f} GiB"
            )


if __name__ == "__main__":
    main()
