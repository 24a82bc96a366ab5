"""Convert a model between formats: `python -m ldm.convert INPUT OUTPUT --to sd|diffusers|lora`.

INPUT is detected: a training checkpoint written by train.py (its EMA weights by default), an
original Stable Diffusion single file (.safetensors or .ckpt, SD 1.x or 2.x), or a diffusers
folder. OUTPUT is an SD single file (.safetensors) or a diffusers folder; `--merge-lora FILE:SCALE`
(repeatable) adds LoRAs to the weights on the way. `--to lora` writes the adapters of a LoRA run's
checkpoint as a LoRA file (`--format kohya`, for A1111/ComfyUI/kohya, or `diffusers`, for
`load_lora_weights`); with `--base MODEL`, INPUT may also be a LoRA file to convert between formats.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.cli import one_line_errors
from ldm.errors import UserError
from ldm.formats import detect_format, export_diffusers, export_single_file, load_bundle
from ldm.formats.lora import FORMATS, apply_loras, export_lora, read_lora
from ldm.formats.training import export_checkpoint_lora

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="training .ckpt, SD .safetensors/.ckpt, or diffusers folder")
    parser.add_argument("output", help="an .safetensors file (--to sd) or a folder (--to diffusers)")
    parser.add_argument("--to", choices=("sd", "diffusers", "lora"), required=True)
    parser.add_argument("--format", choices=FORMATS, default="kohya", help="--to lora: the key layout (default kohya)")
    parser.add_argument(
        "--merge-lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="add a LoRA (kohya, diffusers or a LoRA run's .ckpt) to the weights, times SCALE (default 1); repeatable",
    )
    parser.add_argument("--base", help="--to lora with a LoRA file as INPUT: the model it belongs to")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="cast the weights (default fp32)")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    parser.add_argument("--prediction-type", choices=("eps", "v", "x0"), help="override (SD 2.x 768 models: v)")
    parser.add_argument("--image-size", type=int, help="override the native resolution (SD 2.x 768 models: 768)")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="PART=PATH",
        help="new place of a frozen part's file a training checkpoint refers to (unet=, autoencoder= or conditioner=)",
    )
    return parser.parse_args(argv)


def parse_sources(pairs: list[str]) -> dict[str, str]:
    """``["autoencoder=PATH", ...]`` -> ``{"autoencoder": PATH}``, refusing other part names."""
    sources = {}
    for pair in pairs:
        part, _, path = pair.partition("=")
        if part not in ("unet", "autoencoder", "conditioner") or not path:
            raise UserError(f"--source takes unet=PATH, autoencoder=PATH or conditioner=PATH, got {pair!r}")
        sources[part] = path
    return sources


def parse_lora_scales(values: list[str]) -> list[tuple[str, float]]:
    """``["a.safetensors:0.8", "b.safetensors"]`` -> ``[("a.safetensors", 0.8), ("b.safetensors", 1.0)]``."""
    parsed = []
    for value in values:
        path, _, scale = value.rpartition(":")
        try:
            parsed.append((path, float(scale)) if path else (value, 1.0))
        except ValueError:
            parsed.append((value, 1.0))  # a ':' inside the path, no scale
    return parsed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors():
        if args.to == "lora":
            export_lora_file(args)
            return
        kind = detect_format(args.input)
        sources = parse_sources(args.source)
        bundle = load_bundle(args.input, not args.no_ema, args.prediction_type, args.image_size, sources)
        loras = parse_lora_scales(args.merge_lora)
        if loras:
            bundle = apply_loras(bundle, [(read_lora(path, bundle), scale) for path, scale in loras])
        export = export_single_file if args.to == "sd" else export_diffusers
        out = export(bundle, args.output, DTYPES[args.dtype])
        merged = "".join(f" + {path} x {scale:g}" for path, scale in loras)
        print(f"{kind} ({bundle.family}, {bundle.prediction_type}){merged} -> {args.to}: {out}")


def export_lora_file(args: argparse.Namespace) -> None:
    """``--to lora``: a LoRA run's checkpoint, or a LoRA file of ``--base``'s model, written as ``--format``."""
    if args.merge_lora:
        raise UserError("--merge-lora merges LoRAs into a model (--to sd or diffusers), not into a LoRA file")
    if args.base:
        bundle = load_bundle(args.base, not args.no_ema)
        weights = read_lora(args.input, bundle, not args.no_ema)
        out = export_lora(weights, bundle, args.output, args.format, DTYPES[args.dtype], {"base_model": args.base})
    else:
        if detect_format(args.input) != "training":
            raise UserError(
                f"{args.input} is not a training checkpoint: --to lora exports a LoRA run's adapters, "
                f"or converts a LoRA file given --base MODEL"
            )
        out, weights = export_checkpoint_lora(args.input, args.output, args.format, DTYPES[args.dtype], not args.no_ema)
    print(
        f"LoRA ({len(weights.unet)} U-Net + {len(weights.text)} text encoder layers, rank "
        f"{'/'.join(map(str, weights.ranks()))}) -> {args.format}: {out}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
