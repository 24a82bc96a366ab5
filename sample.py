"""Sample images: `python sample.py checkpoint=MODEL prompt="..." | prompts_file=FILE | prompts_shards=SPEC [key=value ...]`.

MODEL is a training checkpoint, an SD 1.x/2.x single file or a diffusers folder. Writes one PNG per
image, `metadata.jsonl`, `grid.png` and `job.json` to `out_dir` (or webdataset shards with
output=shards). Under torchrun or srun every rank samples a disjoint share; a rerun of the same job
makes only what is missing, a different job refuses the folder unless `overwrite=true`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from ldm.cli import one_line_errors
from ldm.errors import UserError
from ldm.diffusion.timesteps import SPACINGS
from ldm.evaluation.sampling_job import (
    FolderOutput,
    JobItem,
    Ranks,
    ShardOutput,
    check_positive,
    claim_out_dir_on_rank_zero,
    init_process_group,
    job_items,
    job_manifest,
    metadata_row,
    read_prompt_records,
    run_job,
)
from ldm.pipeline import TextToImage, pipeline_from_checkpoint

GRID_MAX_IMAGES = 64  # the grid is a preview of the first images
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def pick_device(name: str, ranks: Ranks) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampler_settings(cfg: DictConfig) -> dict[str, Any]:
    """What decides an image besides its prompt and seed (stored with every image)."""
    return {
        "sampler": _sampler_name(), "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
        "negative_prompt": cfg.negative_prompt, "spacing": cfg.spacing, "guidance_rescale": cfg.guidance_rescale,
        "guidance_interval": None if cfg.guidance_interval is None else list(cfg.guidance_interval),
        "checkpoint": str(cfg.checkpoint), "use_ema": cfg.use_ema, "precision": str(cfg.precision),
        "loras": [[path, scale] for path, scale in lora_list(cfg)],
    }  # fmt: skip


def lora_list(cfg: DictConfig) -> list[tuple[str, float]]:
    """``lora=[a,b] lora_scale=[0.8,0.5]`` (or one of each, or no scales: 1.0) as (file, scale) pairs."""
    files, scales = cfg.get("lora") or [], cfg.get("lora_scale")
    files = [files] if isinstance(files, str) else [str(f) for f in files]
    scales = [] if scales is None else [scales] if isinstance(scales, (int, float)) else list(scales)
    if scales and len(scales) != len(files):
        raise UserError(f"{len(files)} lora file(s) but {len(scales)} lora_scale value(s): give one scale per file")
    missing = [f for f in files if not Path(f).expanduser().is_file()]
    if missing:
        raise UserError(f"lora file not found: {missing[0]}")
    try:
        return [(f, float(s)) for f, s in zip(files, scales or [1.0] * len(files))]
    except (TypeError, ValueError):
        raise UserError(f"lora_scale must be numbers, got {scales}") from None


def _sampler_name() -> str:
    return HydraConfig.get().runtime.choices.get("sampler", "custom") if HydraConfig.initialized() else "custom"


def job_settings(cfg: DictConfig) -> dict[str, Any]:
    """Every setting that changes a pixel or a metadata row, as given (job.json compares them)."""
    settings = {k: v for k, v in sampler_settings(cfg).items() if k not in ("checkpoint", "loras")}  # by content
    settings["sampler_options"] = OmegaConf.to_container(cfg.sampler, resolve=True)
    for key in ("prediction_type", "image_size", "width", "height", "seed", "num_images_per_prompt", "output"):
        settings[key] = cfg.get(key)
    if cfg.output == "shards":
        settings["samples_per_shard"] = cfg.samples_per_shard
    return settings


def check_config(cfg: DictConfig) -> None:
    """One-line errors for settings, before anything is read, loaded or written."""
    if str(cfg.precision) not in PRECISIONS:
        raise UserError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision}")
    if cfg.output not in ("folder", "shards"):
        raise UserError(f"output must be 'folder' or 'shards', got {cfg.output!r}")
    if cfg.spacing not in SPACINGS:
        raise UserError(f"spacing must be one of {', '.join(SPACINGS)}, got {cfg.spacing!r}")
    check_positive(steps=cfg.steps, num_images_per_prompt=cfg.num_images_per_prompt, batch_size=cfg.batch_size,
                   samples_per_shard=cfg.samples_per_shard)  # fmt: skip
    check_positive(**{k: cfg.get(k) for k in ("width", "height", "image_size") if cfg.get(k) is not None})
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UserError(f"seed must be an integer, got {cfg.seed!r}")


def image_size_of(cfg: DictConfig, pipeline: TextToImage) -> tuple[int, int]:
    """(height, width): each defaults to the model's side; checked against what the networks halve."""
    height, width = cfg.get("height") or pipeline.image_size, cfg.get("width") or pipeline.image_size
    pipeline.latent_shape_for(height, width)
    return height, width


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
    check_config(cfg)
    interval = guidance_interval(cfg.guidance_interval)
    records = read_prompt_records(cfg.prompt, cfg.prompts_file, cfg.get("prompts_shards"))
    items = job_items(records, cfg.num_images_per_prompt, cfg.seed)
    ranks = Ranks.from_environment()
    device = pick_device(cfg.device, ranks)
    distributed = init_process_group(ranks, device)
    out_dir = Path(cfg.out_dir)
    loras = lora_list(cfg)
    claim_out_dir_on_rank_zero(out_dir, lambda: job_manifest(cfg.checkpoint, records, job_settings(cfg), loras),
                               bool(cfg.get("overwrite", False)), ranks, device)  # fmt: skip
    pipeline, _ = pipeline_from_checkpoint(
        cfg.checkpoint, cfg.use_ema, device, PRECISIONS[str(cfg.precision)], cfg.prediction_type, cfg.image_size, loras
    )
    if cfg.steps > pipeline.schedule.num_timesteps:
        raise UserError(f"steps={cfg.steps} is more than the model's {pipeline.schedule.num_timesteps} timesteps")
    height, width = image_size_of(cfg, pipeline)
    sampler = instantiate(cfg.sampler)
    settings = {**sampler_settings(cfg), "height": height, "width": width}

    def row(item: JobItem, file: str | None = None) -> dict[str, Any]:
        return metadata_row(item, settings, file)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return pipeline(prompts, seeds, sampler, cfg.steps, cfg.guidance_scale, cfg.negative_prompt,
                        cfg.spacing, cfg.guidance_rescale, interval, (height, width))  # fmt: skip

    if cfg.output == "shards":
        output = ShardOutput(out_dir, cfg.samples_per_shard, row)
    else:
        output = FolderOutput(out_dir)
    counts = run_job(items, generate, output, ranks, cfg.batch_size)
    counts = _sum_over_ranks(counts, distributed, device)
    written = output.finalize(items, row) if ranks.rank == 0 else 0
    if ranks.rank == 0 and isinstance(output, FolderOutput):
        _write_grid(out_dir, items[:GRID_MAX_IMAGES], cfg.num_images_per_prompt)
    if counts["failed"]:
        raise UserError(f"{counts['failed']} image(s) came out non-finite (NaN/Inf) and were not written (items named "
                        "above): rerun the same command to remake them; if it repeats, try precision=32")  # fmt: skip
    if ranks.rank != 0:
        return []
    rate = counts["made"] / max(counts["seconds"], 1e-9)
    print(f"{written}/{len(items)} images in {out_dir.resolve()}: made {counts['made']} now "
          f"({rate:.2f} img/s per rank over {ranks.world_size} rank(s)), {counts['skipped']} already there")  # fmt: skip
    if written != len(items):
        raise UserError(f"only {written} of {len(items)} images exist: rerun the same command to finish")
    if isinstance(output, FolderOutput):
        return [row(i, f"{i.name}.png") for i in items]
    return [row(i) for i in items]


def _sum_over_ranks(counts: dict[str, float], distributed: bool, device: torch.device) -> dict[str, float]:
    if not distributed:
        return counts
    import torch.distributed as dist

    values = torch.tensor([counts["made"], counts["skipped"], counts["failed"], counts["seconds"]],
                          dtype=torch.float64, device=device if device.type == "cuda" else "cpu")  # fmt: skip
    dist.all_reduce(values)  # also the barrier before rank 0 writes metadata.jsonl
    made, skipped, failed, seconds = values.tolist()
    return {"made": int(made), "skipped": int(skipped), "failed": int(failed), "seconds": seconds / dist.get_world_size()}


def _write_grid(out_dir: Path, items: list[JobItem], per_row: int) -> None:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    paths = [out_dir / f"{i.name}.png" for i in items]
    images = [pil_to_tensor(Image.open(p)).float() / 255 for p in paths if p.is_file()]  # failed items are missing
    if images:
        save_image(make_grid(torch.stack(images), nrow=per_row, padding=2, pad_value=1.0), out_dir / "grid.png")


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
