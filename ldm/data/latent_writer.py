"""Writing precomputed latent shards: VAE posteriors and text contexts computed once, so training
runs the U-Net only (the format: ``ldm.data.latent_format``; the command: data_scripts/precompute_latents.py).

Output shard ``{split}-NNNNNN.tar`` is made from input shard NNNNNN of that split (in the order
``expand_shards`` gives), sample keys kept; images and captions are read as the image datamodule's
validation reads them (centre crop, its caption keys, filters and skip rules), each input shard
through ``ldm.data.shard_reader`` (a broken one is counted, as training counts it). With
``flips=True`` each image is also encoded flipped, so that ``data.random_flip`` survives the precompute.

Writing is resumable and parallel: a shard is written under a hidden temporary name and renamed when
complete, so an existing ``{split}-NNNNNN.tar`` is complete and is skipped on rerun; rank r of W
takes jobs r, r+W, ... and nothing is shared between ranks.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.latent_format import (
    CONTEXT_DTYPES,
    FLIPPED,
    META_KEY,
    STORE_MODES,
    latents_metadata,
    npy_bytes,
    read_shard_meta,
    same_dataset,
)
from ldm.data.samples import ToTrainingSample
from ldm.data.shard_reader import read_shard
from ldm.data.shard_writer import ShardWriter
from ldm.data.shards import expand_shards
from ldm.data.skips import DataCounts, FilteredOut, SkipSample
from ldm.data.transforms import ImageTransform, to_model_range
from ldm.errors import UserError


@dataclass(frozen=True)
class ShardJob:
    """One input shard and the output shard made from it."""

    source: str
    output: Path


@dataclass
class PrecomputeReport:
    """What one rank did: output shards written and skipped (already complete), samples written, and
    input samples dropped by reason (as the image pipeline drops them: corrupt image, empty caption, ...)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    num_samples: int = 0
    dropped: Counter = field(default_factory=Counter)


def plan_jobs(splits: Mapping[str, str | Sequence[str] | None], out_dir: str | os.PathLike) -> list[ShardJob]:
    """Every (input shard, output shard) pair: input i of split s -> ``out_dir/{s}-{i:06d}.tar``."""
    out_dir = Path(out_dir)
    return [
        ShardJob(url, out_dir / f"{split}-{index:06d}.tar")
        for split, spec in splits.items()
        if spec
        for index, url in enumerate(expand_shards(spec))
    ]


# A sample function: raw webdataset sample, rng -> {"image": (3, H, W) in [-1, 1], "caption": str, "key": str};
# raises SkipSample / FilteredOut for a sample to drop (``ldm.data.samples.ToTrainingSample``).
SampleFn = Callable[[dict[str, Any], random.Random], dict[str, Any]]


class _InputBatches(IterableDataset):
    """Batches of one input shard at a time, never mixing shards: (job index, batch), ..., then
    (job index, {"dropped": counts}) when the shard is done.

    DataLoader workers take whole shards (worker w of n: its jobs w, w+n, ...), and each sample's rng
    (caption choice) is seeded by its key, so the output does not depend on the number of workers.
    """

    def __init__(self, jobs: Sequence[tuple[int, str]], to_sample: SampleFn, batch_size: int, seed: int):
        self.jobs = list(jobs)
        self.to_sample = to_sample
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        worker = get_worker_info()
        jobs = self.jobs if worker is None else self.jobs[worker.id :: worker.num_workers]
        counts = DataCounts()  # warns a few times per reason and process, then counts quietly
        for index, url in jobs:
            batch: list[dict[str, Any]] = []
            for raw in read_shard(url, counts):  # an unreadable or truncated input is counted, not fatal
                try:
                    sample = self.to_sample(raw, random.Random(f"{self.seed}/{raw['__key__']}"))
                except SkipSample as skip:
                    counts.skip(skip.reason, f"{url}:{raw['__key__']}", skip.detail)
                    continue
                except FilteredOut as filtered:
                    counts.filtered(filtered.name)
                    continue
                batch.append({**sample, "json": raw.get("json")})
                if len(batch) == self.batch_size:
                    yield index, _collate_inputs(batch)
                    batch = []
            if batch:
                yield index, _collate_inputs(batch)
            yield index, {"dropped": counts.take()}


def _collate_inputs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "key": [s["key"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
        "json": [s["json"] for s in samples],
    }


def _shard_seed(seed: int, name: str) -> int:
    """The noise seed of one output shard (store="sample"): fixed by the run seed and the shard name."""
    return seed * 2**32 + zlib.crc32(name.encode())


class _Encoder:
    """Image and caption batches -> the per-sample members of latent shards, on ``device``; with
    ``flips`` also those of each image flipped left to right (``*_flipped.npy``)."""

    def __init__(
        self,
        autoencoder: nn.Module,
        conditioner: nn.Module,
        store: str,
        context_dtype: str,
        device: torch.device,
        flips: bool = False,
    ):
        self.autoencoder = autoencoder
        self.conditioner = conditioner
        self.store = store
        self.context_dtype = CONTEXT_DTYPES[context_dtype]
        self.device = device
        self.flips = flips

    @torch.no_grad()
    def context(self, captions: list[str]) -> np.ndarray:
        """Captions -> (B, L, D) hidden states; bf16 autocast on CUDA (as bf16-mixed training runs it)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            context = self.conditioner(captions).float().cpu().numpy()
        if self.context_dtype == np.float16 and np.abs(context).max(initial=0.0) > np.finfo(np.float16).max:
            raise UserError("text contexts overflow float16: use context_dtype=float32")
        return context.astype(self.context_dtype)

    @torch.no_grad()
    def empty_context(self) -> np.ndarray:
        """The context of "" (L, D) in float32, computed in float32: caption dropout's and the model check's."""
        with torch.autocast(self.device.type, enabled=False):
            return self.conditioner([""])[0].float().cpu().numpy()

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> list[dict[str, Any]]:
        images = to_model_range(batch["image"].to(self.device, non_blocking=True))  # uint8 from the image pipeline
        tensors = self.latents(images, generator, "")
        if self.flips:  # (B, 3, H, W) mirrored along W, as ImageTransform's random_flip mirrors the crop
            tensors.update(self.latents(images.flip(-1), generator, FLIPPED))
        context = self.context(batch["caption"])  # (B, L, D)
        samples = []
        for i, key in enumerate(batch["key"]):
            sample = {"__key__": key, "txt": batch["caption"][i], "context.npy": npy_bytes(context[i])}
            sample.update({name: npy_bytes(array[i]) for name, array in tensors.items()})
            if batch["json"][i] is not None:
                sample["json"] = batch["json"][i]
            samples.append(sample)
        return samples

    def latents(self, images: torch.Tensor, generator: torch.Generator, suffix: str) -> dict[str, np.ndarray]:
        """(B, 3, H, W) in [-1, 1] -> {member name: (B, C, h, w) float32} of the store mode."""
        with torch.autocast(self.device.type, enabled=False):  # the VAE in fp32: half precision overflows
            posterior = self.autoencoder.encode(images.float())
        mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()  # (B, C, h, w)
        if self.store == "sample":
            # z = mean + std * eps, eps drawn on the CPU: the same on every device
            eps = torch.randn(mean.shape, generator=generator)
            return {
                f"latent{suffix}.npy": (
                    self.autoencoder.scaling_factor * (mean + torch.exp(0.5 * logvar) * eps)
                ).numpy()
            }
        return {f"mean{suffix}.npy": mean.numpy(), f"logvar{suffix}.npy": logvar.numpy()}


def _check_existing(job: ShardJob, meta: Mapping[str, Any]) -> None:
    """An output left by an earlier run is only reused if the same model made it from the same input."""
    recorded, _ = read_shard_meta(str(job.output))
    difference = same_dataset(recorded, meta)
    if difference is None and recorded.get("source") != job.source:
        difference = f"source {recorded.get('source')} vs {job.source}"
    if difference is not None:
        raise UserError(
            f"{job.output} was made by another run ({difference}): write to a new out directory or delete it"
        )


def precompute_latents(
    autoencoder: nn.Module,
    conditioner: nn.Module,
    splits: Mapping[str, str | Sequence[str] | None],
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    to_sample: SampleFn | None = None,
    store: str = "distribution",
    batch_size: int = 64,
    context_dtype: str = "float16",
    device: str | torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    configs: Mapping[str, Any] | None = None,
    progress: bool = True,
    flips: bool = False,
) -> PrecomputeReport:
    """Encode image-caption shards into latent shards (see the module docstring for the layout).

    splits: split name -> shard spec (``{"train": "/data/train-{000..099}.tar", "val": ...}``);
        input shard i of split s becomes ``out_dir/{s}-{i:06d}.tar``.
    image_size: the size of the images ``to_sample`` gives (recorded; a mismatch raises).
    to_sample: raw sample -> image and caption, dropping samples as the image pipeline does; pass the
        image datamodule's validation one (centre crop, no flip). Default: ``ToTrainingSample`` of a
        centre-cropped ``ImageTransform(image_size)`` and the ``.txt`` caption. A caption drawn from
        several (a JSON list) is drawn once, by a generator seeded with ``seed`` and the sample key.
    store: "distribution" (posterior mean and log-variance: training draws a fresh z each time) or
        "sample" (one scaled z per image, drawn with a per-shard seed: half the size).
    flips: also store the latent of each image flipped left to right (twice the latent bytes), so
        that training on the shards can use ``data.random_flip``.
    rank, world_size: this process takes jobs rank, rank + world_size, ...; ranks share nothing.
    configs: the Hydra configs of the two parts, recorded in every shard for people to read.
    device: where the two parts run (they are moved there); default cuda:LOCAL_RANK if any, else cpu.
    Outputs that exist are complete (they are renamed into place) and are skipped, once checked to
    come from the same model and input shard.
    """
    if store not in STORE_MODES:
        raise UserError(f"store must be one of {STORE_MODES}, got {store!r}")
    if context_dtype not in CONTEXT_DTYPES:
        raise UserError(f"context_dtype must be one of {tuple(CONTEXT_DTYPES)}, got {context_dtype!r}")
    if image_size % autoencoder.downsampling_factor:
        raise UserError(f"image_size {image_size} is not a multiple of the VAE's {autoencoder.downsampling_factor}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in 0..{world_size - 1}")
    device = torch.device(device) if device is not None else _default_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(splits, out_dir)[rank::world_size]
    meta = latents_metadata(autoencoder, conditioner, store, image_size, context_dtype, configs, flips)
    autoencoder.to(device).eval()
    conditioner.to(device).eval()
    encoder = _Encoder(autoencoder, conditioner, store, context_dtype, device, flips)
    empty_context = npy_bytes(encoder.empty_context())  # (L, D) float32

    report = PrecomputeReport()
    pending: list[tuple[int, str]] = []
    for index, job in enumerate(jobs):
        for stale in out_dir.glob(f".{job.output.name}.*.tmp"):  # left by a killed run of this rank
            stale.unlink(missing_ok=True)
        if job.output.exists():
            _check_existing(job, meta)
            report.skipped.append(job.output)
        else:
            pending.append((index, job.source))
    if not pending:
        return report

    from tqdm import tqdm

    to_sample = to_sample or ToTrainingSample(ImageTransform(image_size, center_crop=True))
    dataset = _InputBatches(pending, to_sample, batch_size, seed)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=min(num_workers, len(pending)), pin_memory=device.type == "cuda"
    )
    open_tars: dict[int, tuple[ShardWriter, torch.Generator]] = {}
    bar = tqdm(total=len(pending), desc=f"latents rank {rank}/{world_size}", unit="shard", disable=not progress)
    try:
        for index, batch in loader:
            job = jobs[index]
            if index not in open_tars:
                tar = ShardWriter(job.output)
                tar.write(
                    {
                        "__key__": META_KEY,
                        "json": json.dumps({**meta, "source": job.source}),
                        "empty_context.npy": empty_context,
                    }
                )
                open_tars[index] = (tar, torch.Generator().manual_seed(_shard_seed(seed, job.output.name)))
            tar, generator = open_tars[index]
            if "dropped" in batch:  # the input shard is done
                report.dropped.update(batch["dropped"])
                tar.close()
                del open_tars[index]
                report.written.append(job.output)
                bar.update(1)
                continue
            if batch["image"].shape[-2:] != (image_size, image_size):
                raise UserError(f"images are {tuple(batch['image'].shape[-2:])}, not {image_size} px: fix image_size")
            for sample in encoder(batch, generator):
                tar.write(sample)
            report.num_samples += len(batch["key"])
            bar.set_postfix(images=report.num_samples, refresh=False)
    finally:
        for tar, _ in open_tars.values():  # interrupted: no half-written shard survives
            tar.abort()
        bar.close()
    return report


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")
