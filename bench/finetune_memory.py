"""Memory of a Stable Diffusion fine-tune: every byte of state counted exactly, activations measured.

    python bench/finetune_memory.py [--config sd15|sd21] [--optim adamw|muon] [--no-ema]
        [--activations] [--size 64] [--batch 1] [--no-checkpointing] [--device cpu|cuda]

State (exact, on the meta device: nothing is allocated): the trained U-Net's float32 weights (bf16-mixed
keeps float32 master weights and casts per operation), their float32 gradients, the optimiser's state
(created by one real ``step()`` on meta tensors, so it is what the optimiser allocates, not a formula),
the EMA copy, and the frozen VAE and text encoder (float32, no gradients, no optimiser state).

``--activations`` runs one training forward of the U-Net at ``--size`` (latent side; 64 = 512 px)
and ``--batch`` under bf16 autocast, with the model's gradient checkpointing, and counts the bytes
autograd keeps for the backward pass (distinct storages, through ``saved_tensors_hooks``): the
activation memory that stands beside the state at the end of the forward pass. On a GPU it also
reports the peak ``torch.cuda.max_memory_allocated`` of a whole training step.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from presets import network_configs  # bench/presets.py: the sizes of configs/model/*.yaml
from torch import nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm.models.unet import UNetModel
from ldm.training.optimizers import MuonAdamW

MODELS = {"sd15": "sd15", "sd21": "sd21_base"}  # --config NAME -> the model preset
GIB = 2**30


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(unet: nn.Module, optim: str) -> int:
    """Bytes the optimiser allocates for ``unet``'s parameters, after one real step on meta tensors."""
    params = list(unet.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    if optim == "muon":
        optimizer = MuonAdamW(params, lr=1e-5, fused=False)
        optimizer.step()
        states = [optimizer.state, optimizer._adamw.state]
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)
        optimizer.step()
        states = [optimizer.state]
    total = 0
    for state in states:
        for per_param in state.values():
            total += tensor_bytes(v for v in per_param.values() if torch.is_tensor(v) and v.ndim > 0)
    for p in params:
        p.grad = None
    return total


def state_bytes(config: str, optim: str, ema: bool) -> dict[str, int]:
    networks = network_configs(MODELS[config])
    with torch.device("meta"):
        unet = UNetModel(**networks["unet"])
        vae = AutoencoderKL(**networks["vae"])
        text = OpenCLIPTextEncoder(**networks["text"])
    weights = tensor_bytes(unet.state_dict().values())
    rows = {
        "U-Net weights (fp32)": weights,
        "U-Net gradients (fp32)": tensor_bytes(unet.parameters()),
        f"optimiser state ({optim})": optimizer_state_bytes(unet, optim),
        "EMA copy (fp32)": weights if ema else 0,
        "VAE (frozen, fp32)": tensor_bytes(vae.state_dict().values()),
        "text encoder (frozen, fp32)": tensor_bytes(text.model.state_dict().values()),
    }
    rows["U-Net parameters (count)"] = sum(p.numel() for p in unet.parameters())
    return rows


def forward_saved_bytes(
    unet: nn.Module, context_dim: int, size: int, batch: int, device: str, weights: Iterable[torch.Tensor]
) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves for backward in one bf16-autocast training forward
    of ``unet`` (those of ``weights`` left out: they are counted as state), and the loss to backward."""
    x = torch.randn(batch, 4, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 77, context_dim, device=device)
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    excluded = {(w.untyped_storage().data_ptr(), w.untyped_storage().nbytes()) for w in weights}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = unet(x, t, context).float().pow(2).mean()
    return sum(n for key, n in seen.items() if key not in excluded), loss


def saved_activation_bytes(config: str, size: int, batch: int, checkpointing: bool, device: str) -> int:
    """Bytes autograd saves for backward in one U-Net training forward (``forward_saved_bytes``)."""
    unet_config = network_configs(MODELS[config])["unet"]
    unet = UNetModel(**dict(unet_config, gradient_checkpointing=checkpointing)).to(device)
    saved, loss = forward_saved_bytes(unet, unet_config["context_dim"], size, batch, device, unet.parameters())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        print(f"peak GPU memory of the forward+backward: {torch.cuda.max_memory_allocated() / GIB:.2f} GiB")
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--optim", choices=("adamw", "muon"), default="adamw")
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--activations", action="store_true", help="also run a forward pass (slow on a CPU)")
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px images)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    rows = state_bytes(args.config, args.optim, not args.no_ema)
    count = rows.pop("U-Net parameters (count)")
    print(f"{args.config}: U-Net {count / 1e6:.1f}M parameters")
    for name, value in rows.items():
        print(f"  {name:<32} {value / GIB:8.3f} GiB  ({value:,} bytes)")
    total = sum(rows.values())
    print(f"  {'state in all':<32} {total / GIB:8.3f} GiB")
    if args.activations:
        saved = saved_activation_bytes(args.config, args.size, args.batch, not args.no_checkpointing, args.device)
        print(
            f"  {'saved activations':<32} {saved / GIB:8.3f} GiB  (batch {args.batch}, latents {args.size}x{args.size}, "
            f"checkpointing {'off' if args.no_checkpointing else 'on'})"
        )
        print(f"  {'state + saved activations':<32} {(total + saved) / GIB:8.3f} GiB")


if __name__ == "__main__":
    main()
