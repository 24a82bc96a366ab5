"""Convert a model between formats: `python -m ldm.convert INPUT OUTPUT --to sd|diffusers`.

INPUT is detected: a training checkpoint written by train.py (its EMA weights by default), an
original Stable Diffusion single file (.safetensors or .ckpt, SD 1.x or 2.x), or a diffusers
folder. OUTPUT is an SD single file (.safetensors) or a diffusers folder.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.cli import one_line_errors
from ldm.errors import UserError
from ldm.formats import detect_format, export_diffusers, export_single_file, load_bundle

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="training .ckpt, SD .safetensors/.ckpt, or diffusers folder")
    parser.add_argument("output", help="an .safetensors file (--to sd) or a folder (--to diffusers)")
    parser.add_argument("--to", choices=("sd", "diffusers"), required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="cast the weights (default fp32)")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    parser.add_argument("--prediction-type", choices=("eps", "v", "x0"), help="override (SD 2.x 768 models: v)")
    parser.add_argument("--image-size", type=int, help="override the native resolution (SD 2.x 768 models: 768)")
    parser.add_argument(
        "--source", action="append", default=[], metavar="PART=PATH",
        help="new place of a frozen part's file a training checkpoint refers to (autoencoder=... or conditioner=...)",
    )  # fmt: skip
    return parser.parse_args(argv)


def parse_sources(pairs: list[str]) -> dict[str, str]:
    """``["autoencoder=PATH", ...]`` -> ``{"autoencoder": PATH}``, refusing other part names."""
    sources = {}
    for pair in pairs:
        part, _, path = pair.partition("=")
        if part not in ("autoencoder", "conditioner") or not path:
            raise UserError(f"--source takes autoencoder=PATH or conditioner=PATH, got {pair!r}")
        sources[part] = path
    return sources


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors():
        kind = detect_format(args.input)
        sources = parse_sources(args.source)
        bundle = load_bundle(args.input, not args.no_ema, args.prediction_type, args.image_size, sources)
        export = export_single_file if args.to == "sd" else export_diffusers
        out = export(bundle, args.output, DTYPES[args.dtype])
        print(f"{kind} ({bundle.family}, {bundle.prediction_type}) -> {args.to}: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
