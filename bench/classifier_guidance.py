"""Cost of classifier guidance per sampling step on the toy: the model function with and without it.

    python bench/classifier_guidance.py [--batch 16] [--repeats 20]

Random weights (the cost does not depend on them): the toy U-Net (configs/model/toy.yaml) under
classifier-free guidance, and the same plus the toy classifier's gradient (configs/experiment/toy_classifier.yaml).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.diffusion.classifier_guidance import ClassifierGuidance, ClassLogLikelihood
from ldm.diffusion.denoiser import ClassifierFreeGuidance

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def seconds_per_call(fns: list, x: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds per call of each function, calls interleaved (a shared CPU drifts between runs)."""
    for fn in fns:
        fn(x, 500)  # warm-up (first-call kernel selection)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn(x, 900 - 40 * (i % 20))
            record.append(time.perf_counter() - start)
    return [sorted(record)[len(record) // 2] for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["experiment=toy_classifier"])
    unet = instantiate(cfg.model.unet).eval()
    classifier = instantiate(cfg.model.classifier, _convert_="all").eval().requires_grad_(False)
    schedule = instantiate(cfg.schedule)
    context = torch.randn(args.batch, 77, cfg.model.unet.context_dim)
    cfg_fn = ClassifierFreeGuidance(unet, context, torch.zeros_like(context), scale=3.0)
    labels = {name: torch.zeros(args.batch, dtype=torch.long) for name in classifier.heads_classes}
    guided = ClassifierGuidance(
        cfg_fn, ClassLogLikelihood(classifier, labels), 2.0, schedule, cfg.model.prediction_type
    )
    x = torch.randn(args.batch, 4, 16, 16)
    with torch.no_grad():
        plain, both = seconds_per_call([cfg_fn, guided], x, args.repeats)
    print(
        f"batch {args.batch}, {torch.get_num_threads()} threads: CFG {1e3 * plain / args.batch:.2f} ms/image/step, "
        f"CFG + classifier {1e3 * both / args.batch:.2f} ms/image/step ({both / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()
