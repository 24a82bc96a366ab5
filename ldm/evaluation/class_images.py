"""DreamBooth's class images (Ruiz et al. 2023, prior preservation) as a sampling job: ``count`` images
of ``prompt`` drawn by the base model, seeds ``seed + i``, ``NNNNNN.png`` + ``metadata.jsonl`` +
``job.json`` in ``directory`` (``ldm.evaluation.sampling_job``).

Resumable (a killed generation makes only what is missing), reused by every later run of the same job,
refused in one line when the folder holds another job's images; a folder of images without a
``job.json`` (class photos the user brings) is used as it is. ``data=dreambooth``
(``ldm.training.dreambooth.DreamBoothDataModule``) builds one through ``data.class_image_job``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.data.folder import index_folder
from ldm.errors import UserError
from ldm.evaluation.sampling_job import (
    MANIFEST,
    FolderOutput,
    JobItem,
    Ranks,
    claim_out_dir,
    job_items,
    job_manifest,
    metadata_row,
    run_job,
)
from ldm.pipeline import pipeline_from_checkpoint


def sampler_description(sampler: Callable[..., Any]) -> str:
    """A stable name of a sampler (``functools.partial`` of a sampling function) for the job manifest."""
    if isinstance(sampler, functools.partial):
        keywords = ",".join(f"{k}={v}" for k, v in sorted(sampler.keywords.items()))
        return f"{sampler.func.__module__}.{sampler.func.__qualname__}({keywords})"
    return f"{getattr(sampler, '__module__', '?')}.{getattr(sampler, '__qualname__', type(sampler).__name__)}"


class ClassImageJob:
    """The class images of ``prompt`` in ``directory``: which to make, making them, and their files."""

    def __init__(
        self,
        directory: Path,
        prompt: str,
        count: int,
        sampler: Callable[..., torch.Tensor],
        steps: int,
        guidance_scale: float,
        negative_prompt: str,
        batch_size: int,
        seed: int,
        image_size: int,
    ):
        self.directory = Path(directory)
        self.prompt = prompt
        self.count = int(count)
        self.sampler = sampler
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.batch_size = batch_size
        self.seed = seed
        self.image_size = image_size

    def is_user_folder(self) -> bool:
        """A folder of images brought by the user (no ``job.json``): used as it is, nothing is made."""
        if not self.directory.is_dir() or (self.directory / MANIFEST).is_file():
            return False
        return any(index_folder(self.directory).paths)

    def wanted(self) -> bool:
        return not self.is_user_folder()

    def files(self) -> list[str] | None:
        """The job's images (``NNNNNN.png``, relative to ``directory``), or None for a user's folder."""
        return None if self.is_user_folder() else [f"{i:06d}.png" for i in range(self.count)]

    def settings(self) -> dict[str, Any]:
        """What the job's images depend on besides the model and the prompt (its ``job.json``)."""
        return {
            "sampler": sampler_description(self.sampler),
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "image_size": self.image_size,
            "seed": self.seed,
            "purpose": "dreambooth class images",
        }

    def make(self, base_model: str, device: str | torch.device | None = None) -> int:
        """Make the missing class images with ``base_model``; returns how many were made now."""
        records = [{"prompt": self.prompt}]
        items = job_items(records, self.count, self.seed)
        settings = self.settings()
        claim_out_dir(self.directory, job_manifest(base_model, records, settings))
        output = FolderOutput(self.directory)
        if all(output.done(item) for item in items):
            print(f"data: reusing the {self.count} class images in {self.directory}")
            return 0
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        counts = self._run(base_model, items, output, device)  # the pipeline is freed when it returns
        written = output.finalize(items, lambda item, file: metadata_row(item, settings, file))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if written != self.count:
            raise UserError(
                f"only {written} of {self.count} class images exist in {self.directory} "
                f"({counts['failed']} failed): rerun"
            )
        print(
            f"data: made {counts['made']} class images of {self.prompt!r} in {self.directory} ({counts['seconds']:.0f} s)"
        )
        return int(counts["made"])

    def _run(
        self, base_model: str, items: Sequence[JobItem], output: FolderOutput, device: torch.device
    ) -> dict[str, Any]:
        autocast = torch.bfloat16 if device.type == "cuda" else None
        pipeline, _ = pipeline_from_checkpoint(base_model, True, device, autocast)
        size = (self.image_size, self.image_size)

        def generate(batch: list[JobItem]) -> torch.Tensor:
            prompts, seeds = [item.prompt for item in batch], [item.seed for item in batch]
            return pipeline(
                prompts, seeds, self.sampler, self.steps, self.guidance_scale, self.negative_prompt, size=size
            )

        return run_job(items, generate, output, Ranks(0, 1, 0), self.batch_size)
