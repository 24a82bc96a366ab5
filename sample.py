"""Sample images from a trained checkpoint: `python sample.py checkpoint=CKPT prompt="..." [key=value ...]`.

Writes one PNG per image, `metadata.jsonl` (one JSON line per image) and `grid.png` to `out_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from ldm.cli import one_line_errors
from ldm.errors import UserError
from ldm.pipeline import pipeline_from_checkpoint, to_uint8

GRID_MAX_IMAGES = 64  # the grid is a preview: the first prompts only
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def read_prompts(cfg: DictConfig) -> list[str]:
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise UserError("give exactly one of prompt=... or prompts_file=...")
    if cfg.prompt is not None:
        return [str(cfg.prompt)]
    path = Path(cfg.prompts_file).expanduser()
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file is empty: {path}")
    return prompts


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample(cfg: DictConfig) -> list[dict[str, Any]]:
    """Generate every (prompt, seed) image of ``cfg`` into ``cfg.out_dir``; returns the metadata rows."""
    prompts = read_prompts(cfg)
    if str(cfg.precision) not in PRECISIONS:
        raise UserError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision}")
    device = pick_device(cfg.device)
    pipeline, _ = pipeline_from_checkpoint(
        cfg.checkpoint, cfg.use_ema, device, PRECISIONS[str(cfg.precision)], cfg.prediction_type, cfg.image_size
    )
    sampler = instantiate(cfg.sampler)
    sampler_name = HydraConfig.get().runtime.choices.get("sampler", "custom") if HydraConfig.initialized() else "custom"
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = cfg.num_images_per_prompt
    jobs = [(i * n + j, p, cfg.seed + i * n + j) for i, p in enumerate(prompts) for j in range(n)]
    rows, images = [], []
    with tqdm(total=len(jobs), desc="sampling", unit="img") as progress:
        for start in range(0, len(jobs), cfg.batch_size):
            batch = jobs[start : start + cfg.batch_size]
            pixels = pipeline(
                [p for _, p, _ in batch], [s for _, _, s in batch], sampler, cfg.steps,
                cfg.guidance_scale, cfg.negative_prompt, cfg.spacing,
            )
            for (index, prompt, seed), image in zip(batch, to_uint8(pixels)):
                name = f"{index:05d}.png"
                Image.fromarray(image.numpy()).save(out_dir / name)
                rows.append({
                    "file": name, "prompt": prompt, "seed": seed, "sampler": sampler_name, "steps": cfg.steps,
                    "guidance_scale": cfg.guidance_scale, "negative_prompt": cfg.negative_prompt,
                    "spacing": cfg.spacing, "checkpoint": str(cfg.checkpoint), "use_ema": cfg.use_ema,
                })
            if sum(len(x) for x in images) < GRID_MAX_IMAGES:
                images.append(pixels.cpu())
            progress.update(len(batch))
    with open(out_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    save_image(make_grid(torch.cat(images)[:GRID_MAX_IMAGES], nrow=n, padding=2, pad_value=1.0), out_dir / "grid.png")
    print(f"wrote {len(rows)} images, metadata.jsonl and grid.png to {out_dir.resolve()}")
    return rows


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
