"""Sample images: `python sample.py checkpoint=MODEL prompt="..." | prompts_file=FILE | prompts_shards=SPEC [key=value ...]`.

MODEL is a training checkpoint, an SD 1.x/2.x single file or a diffusers folder. Writes one PNG per
image, `metadata.jsonl`, `grid.png` and `job.json` to `out_dir` (or webdataset shards with
output=shards). Under torchrun or srun every rank samples a disjoint share; a rerun of the same job
makes only what is missing, a different job refuses the folder unless `overwrite=true`.
`init_images=DIR|SHARDS strength=S` samples from input images (image-to-image), with `masks=...`
inpaints them; `classifier=CKPT classifier_scale=S [labels=...]` adds classifier guidance.
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
from ldm.diffusion.timesteps import SPACINGS
from ldm.errors import UserError
from ldm.evaluation.classifier_labels import ClassifierJob
from ldm.evaluation.init_images import InitImageJob
from ldm.evaluation.sampling_job import (
    FolderOutput,
    JobItem,
    Ranks,
    ShardOutput,
    check_positive,
    checkpoint_fingerprint,
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
        "sampler": _sampler_name(),
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "negative_prompt": cfg.negative_prompt,
        "spacing": cfg.spacing,
        "guidance_rescale": cfg.guidance_rescale,
        "guidance_interval": None if cfg.guidance_interval is None else list(cfg.guidance_interval),
        "checkpoint": str(cfg.checkpoint),
        "use_ema": cfg.use_ema,
        "precision": str(cfg.precision),
        "loras": [[path, scale] for path, scale in lora_list(cfg)],
    }


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


def input_settings(cfg: DictConfig, init: InitImageJob | None) -> dict[str, Any]:
    """The classifier guidance and input image settings of a job that uses them (stored with every image)."""
    settings: dict[str, Any] = {}
    if cfg.get("classifier") is not None:
        settings.update(classifier=str(cfg.classifier), classifier_scale=cfg.classifier_scale)
    if init is not None:
        settings.update(
            init_images=str(cfg.init_images), masks=None if cfg.masks is None else str(cfg.masks), **init.settings()
        )
    return settings


def input_manifest(cfg: DictConfig, init: InitImageJob | None) -> dict[str, Any]:
    """job.json's record of the inputs, by content: the classifier's fingerprint, the labels as given, the
    digests of the init images and masks (a rerun with other ones refuses the folder)."""
    manifest = {k: v for k, v in input_settings(cfg, init).items() if k not in ("classifier", "init_images", "masks")}
    if cfg.get("classifier") is not None:
        manifest.update(classifier=checkpoint_fingerprint(cfg.classifier), labels=_plain(cfg.labels))
    if init is not None:
        manifest.update(init.manifest())
    return manifest


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_config(cfg: DictConfig) -> None:
    """One-line errors for settings, before anything is read, loaded or written."""
    if str(cfg.precision) not in PRECISIONS:
        raise UserError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision}")
    if cfg.output not in ("folder", "shards"):
        raise UserError(f"output must be 'folder' or 'shards', got {cfg.output!r}")
    if cfg.spacing not in SPACINGS:
        raise UserError(f"spacing must be one of {', '.join(SPACINGS)}, got {cfg.spacing!r}")
    check_positive(
        steps=cfg.steps,
        num_images_per_prompt=cfg.num_images_per_prompt,
        batch_size=cfg.batch_size,
        samples_per_shard=cfg.samples_per_shard,
    )
    check_positive(**{k: cfg.get(k) for k in ("width", "height", "image_size") if cfg.get(k) is not None})
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UserError(f"seed must be an integer, got {cfg.seed!r}")
    check_input_config(cfg)


def check_input_config(cfg: DictConfig) -> None:
    """One-line errors for the classifier guidance and input image keys."""
    if cfg.get("classifier") is None and cfg.get("labels") is not None:
        raise UserError("labels=... chooses the classes of classifier guidance: give classifier=CKPT too")
    scale = cfg.get("classifier_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise UserError(f"classifier_scale must be a number >= 0, got {scale!r}")
    if cfg.get("init_images") is None:
        for key in ("masks", "strength"):
            if cfg.get(key) is not None:
                raise UserError(f"{key}=... needs init_images=DIR|SHARDS (the images to start from)")
        return
    strength = cfg.get("strength")
    if strength is not None and (
        isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1
    ):
        raise UserError(f"strength must be a number in [0, 1], got {strength!r}")
    check_positive(**{f"inpaint.{k}": cfg.inpaint.get(k) for k in ("resample_steps", "jump_length")})


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
    init = init_image_job(cfg)
    if init is not None:
        records = init.pair(records, "prompt" if cfg.prompt is not None else "prompts_file/prompts_shards")
    classifier = load_classifier_job(cfg, records)
    items = job_items(records, cfg.num_images_per_prompt, cfg.seed)
    ranks = Ranks.from_environment()
    device = pick_device(cfg.device, ranks)
    distributed = init_process_group(ranks, device)
    out_dir = Path(cfg.out_dir)
    loras = lora_list(cfg)
    claim_out_dir_on_rank_zero(
        out_dir,
        lambda: job_manifest(cfg.checkpoint, records, {**job_settings(cfg), **input_manifest(cfg, init)}, loras),
        bool(cfg.get("overwrite", False)),
        ranks,
        device,
    )
    pipeline, _ = pipeline_from_checkpoint(
        cfg.checkpoint, cfg.use_ema, device, PRECISIONS[str(cfg.precision)], cfg.prediction_type, cfg.image_size, loras
    )
    if cfg.steps > pipeline.schedule.num_timesteps:
        raise UserError(f"steps={cfg.steps} is more than the model's {pipeline.schedule.num_timesteps} timesteps")
    height, width = image_size_of(cfg, pipeline)
    if classifier is not None:
        from ldm.training.classifier import check_classifier_fits  # Lightning loads only for guided jobs

        check_classifier_fits(classifier.spec, cfg.classifier, pipeline.autoencoder, pipeline.schedule)
        classifier.classifier.to(device)
    sampler = instantiate(cfg.sampler)
    settings = {**sampler_settings(cfg), **input_settings(cfg, init), "height": height, "width": width}

    def record_of(item: JobItem) -> int:
        return item.index // cfg.num_images_per_prompt

    def row(item: JobItem, file: str | None = None) -> dict[str, Any]:
        fields = {
            **(init.fields(record_of(item)) if init else {}),
            **(classifier.fields(record_of(item)) if classifier else {}),
        }
        return metadata_row(item, {**settings, **fields}, file)

    def generate(batch: list[JobItem]) -> torch.Tensor:
        records_of_batch = [record_of(item) for item in batch]
        return pipeline(
            [i.prompt for i in batch],
            [i.seed for i in batch],
            sampler,
            cfg.steps,
            cfg.guidance_scale,
            cfg.negative_prompt,
            cfg.spacing,
            cfg.guidance_rescale,
            interval,
            (height, width),
            init=init.inputs(records_of_batch, height, width) if init else None,
            classifier=classifier.guide(records_of_batch) if classifier else None,
        )

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
        raise UserError(
            f"{counts['failed']} image(s) came out non-finite (NaN/Inf) and were not written (items named "
            "above): rerun the same command to remake them; if it repeats, try precision=32"
        )
    if ranks.rank != 0:
        return []
    rate = counts["made"] / max(counts["seconds"], 1e-9)
    print(
        f"{written}/{len(items)} images in {out_dir.resolve()}: made {counts['made']} now "
        f"({rate:.2f} img/s per rank over {ranks.world_size} rank(s)), {counts['skipped']} already there"
    )
    if written != len(items):
        raise UserError(f"only {written} of {len(items)} images exist: rerun the same command to finish")
    if isinstance(output, FolderOutput):
        return [row(i, f"{i.name}.png") for i in items]
    return [row(i) for i in items]


def init_image_job(cfg: DictConfig) -> InitImageJob | None:
    """The input images (and masks) of an image-to-image or inpainting job, listed (not yet read)."""
    if cfg.get("init_images") is None:
        return None
    return InitImageJob.from_settings(
        _plain(cfg.init_images), _plain(cfg.masks), cfg.strength, cfg.inpaint.resample_steps, cfg.inpaint.jump_length
    )


def load_classifier_job(cfg: DictConfig, records: list[dict[str, Any]]) -> ClassifierJob | None:
    """The guidance classifier (on the CPU) and the classes each prompt record is guided to."""
    if cfg.get("classifier") is None:
        return None
    from ldm.training.classifier import load_classifier  # Lightning loads only for guided jobs

    network, spec = load_classifier(cfg.classifier)
    return ClassifierJob(network, spec, cfg.classifier_scale, records, _plain(cfg.labels))


def _sum_over_ranks(counts: dict[str, float], distributed: bool, device: torch.device) -> dict[str, float]:
    if not distributed:
        return counts
    import torch.distributed as dist

    values = torch.tensor(
        [counts["made"], counts["skipped"], counts["failed"], counts["seconds"]],
        dtype=torch.float64,
        device=device if device.type == "cuda" else "cpu",
    )
    dist.all_reduce(values)  # also the barrier before rank 0 writes metadata.jsonl
    made, skipped, failed, seconds = values.tolist()
    return {
        "made": int(made),
        "skipped": int(skipped),
        "failed": int(failed),
        "seconds": seconds / dist.get_world_size(),
    }


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
