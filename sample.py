"""Sample images: `python sample.py checkpoint=MODEL prompt="..." | prompts_file=FILE | prompts_shards=SPEC [key=value ...]`.

MODEL is a training checkpoint, an SD 1.x/2.x single file or a diffusers folder. Writes one PNG per
image, `metadata.jsonl` and `grid.png` to `out_dir` (or webdataset shards with output=shards).
Under torchrun or srun every rank samples a disjoint share; a rerun makes only what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from ldm.cli import one_line_errors
from ldm.errors import UserError
from ldm.evaluation.sampling_job import (
    FolderOutput,
    JobItem,
    Ranks,
    ShardOutput,
    init_process_group,
    job_items,
    read_prompt_records,
    run_job,
)
from ldm.pipeline import pipeline_from_checkpoint

GRID_MAX_IMAGES = 64  # the grid is a preview of the first images
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def pick_device(name: str, ranks: Ranks) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampler_settings(cfg: DictConfig) -> dict[str, Any]:
    """What decides an image besides its prompt and seed (stored with every image)."""
    name = HydraConfig.get().runtime.choices.get("sampler", "custom") if HydraConfig.initialized() else "custom"
    return {
        "sampler": name, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
        "negative_prompt": cfg.negative_prompt, "spacing": cfg.spacing, "guidance_rescale": cfg.guidance_rescale,
        "guidance_interval": None if cfg.guidance_interval is None else list(cfg.guidance_interval),
        "checkpoint": str(cfg.checkpoint), "use_ema": cfg.use_ema, "precision": str(cfg.precision),
    }  # fmt: skip


def guidance_interval(value: Any) -> tuple[int, int] | None:
    """``guidance_interval=[t_min,t_max]`` as a pair of timesteps, or a one-line error."""
    if value is None:
        return None
    try:
        low, high = (int(t) for t in value)
    except (TypeError, ValueError):
        raise UserError(f"guidance_interval must be [t_min, t_max] (timesteps), got {value}") from None
    if not 0 <= low <= high:
        raise UserError(f"guidance_interval must have 0 <= t_min <= t_max, got [{low}, {high}]")
    return low, high


def sample(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the sampling job of ``cfg``; returns the metadata rows of the images on disk (rank 0)."""
    if str(cfg.precision) not in PRECISIONS:
        raise UserError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision}")
    if cfg.output not in ("folder", "shards"):
        raise UserError(f"output must be 'folder' or 'shards', got {cfg.output!r}")
    interval = guidance_interval(cfg.guidance_interval)
    records = read_prompt_records(cfg.prompt, cfg.prompts_file, cfg.get("prompts_shards"))
    items = job_items(records, cfg.num_images_per_prompt, cfg.seed)
    ranks = Ranks.from_environment()
    device = pick_device(cfg.device, ranks)
    distributed = init_process_group(ranks, device)
    pipeline, _ = pipeline_from_checkpoint(
        cfg.checkpoint, cfg.use_ema, device, PRECISIONS[str(cfg.precision)], cfg.prediction_type, cfg.image_size
    )
    sampler = instantiate(cfg.sampler)
    settings = sampler_settings(cfg)

    def row(item: JobItem) -> dict[str, Any]:
        return {"index": item.index, "prompt": item.prompt, "seed": item.seed, **settings, **item.fields}

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return pipeline(prompts, seeds, sampler, cfg.steps, cfg.guidance_scale, cfg.negative_prompt,
                        cfg.spacing, cfg.guidance_rescale, interval)  # fmt: skip

    out_dir = Path(cfg.out_dir)
    if cfg.output == "shards":
        output = ShardOutput(out_dir, cfg.samples_per_shard, row)
    else:
        output = FolderOutput(out_dir)
    counts = run_job(items, generate, output, ranks, cfg.batch_size, row)
    counts = _sum_over_ranks(counts, distributed, device)
    if ranks.rank != 0:
        return []
    written = output.finalize(items, row)
    if isinstance(output, FolderOutput):
        _write_grid(out_dir, items[:GRID_MAX_IMAGES], cfg.num_images_per_prompt)
    rate = counts["made"] / max(counts["seconds"], 1e-9)
    print(f"{written}/{len(items)} images in {out_dir.resolve()}: made {counts['made']} now "
          f"({rate:.2f} img/s per rank over {ranks.world_size} rank(s)), {counts['skipped']} already there")  # fmt: skip
    if written != len(items):
        raise UserError(f"only {written} of {len(items)} images exist: rerun the same command to finish")
    if isinstance(output, FolderOutput):
        return [{"file": f"{i.name}.png", **row(i)} for i in items]
    return [row(i) for i in items]


def _sum_over_ranks(counts: dict[str, float], distributed: bool, device: torch.device) -> dict[str, float]:
    if not distributed:
        return counts
    import torch.distributed as dist

    values = torch.tensor([counts["made"], counts["skipped"], counts["seconds"]], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")  # fmt: skip
    dist.all_reduce(values)  # also the barrier before rank 0 writes metadata.jsonl
    made, skipped, seconds = values.tolist()
    return {"made": int(made), "skipped": int(skipped), "seconds": seconds / dist.get_world_size()}


def _write_grid(out_dir: Path, items: list[JobItem], per_row: int) -> None:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    images = [pil_to_tensor(Image.open(out_dir / f"{i.name}.png")).float() / 255 for i in items]
    if images:
        save_image(make_grid(torch.stack(images), nrow=per_row, padding=2, pad_value=1.0), out_dir / "grid.png")


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
