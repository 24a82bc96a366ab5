"""Precomputed latent shards: VAE posteriors and text contexts computed once, so training runs the U-Net only.

Layout: output shard ``{split}-NNNNNN.tar`` is made from input shard NNNNNN of that split (in the
order ``expand_shards`` gives), sample keys kept; images and captions are read as the image
datamodule's validation reads them (centre crop, its caption keys, filters and skip rules). Per sample:

    mean.npy, logvar.npy  (C, h, w) float32   store="distribution": the posterior q(z|x) of the VAE
    latent.npy            (C, h, w) float32   store="sample": scaling_factor * z, one z ~ q(z|x)
    context.npy           (L, D) float16|32   the text encoder's hidden states of the caption
    txt                                       the caption encoded (as picked and cleaned by the image pipeline)
    json                                      the input's .json, unchanged

Every shard opens with a ``__meta__`` sample: ``__meta__.json`` (the identity of the VAE and text
encoder: fingerprints, attributes and configs; scaling factor, image size, store mode; the source
shard) and ``__meta__.empty_context.npy`` (the float32 context of "", for caption dropout and the
model check). Readers check it against the model they train (``check_latents_match``) and drop it.

Writing is resumable and parallel: a shard is written under a hidden temporary name and renamed when
complete, so an existing ``{split}-NNNNNN.tar`` is complete and is skipped on rerun; rank r of W
takes jobs r, r+W, ... and nothing is shared between ranks.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.samples import ToTrainingSample
from ldm.data.shards import expand_shards
from ldm.data.skips import DataCounts, FilteredOut, SkipSample
from ldm.data.transforms import ImageTransform, to_model_range
from ldm.errors import UserError
from ldm.checkpoints import fingerprint

FORMAT = "ldm.latents/1"
STORE_MODES = ("distribution", "sample")
CONTEXT_DTYPES = {"float16": np.float16, "float32": np.float32}
META_KEY = "__meta__"
TAR_MTIME = 0  # fixed member mtime: one input gives byte-identical output shards
# Plain attributes that change what a frozen part computes without changing its weights.
IDENTITY_ATTRIBUTES = (
    "downsampling_factor", "latent_channels",  # VAE (scaling_factor is checked on its own)
    "num_blocks", "pad_token_id", "max_length", "context_dim",  # text encoder: layer, padding, shape
)
# The empty prompt's context is stored in float32 from a float32 run of the text encoder, so a
# float32 rerun on any device agrees to ~1e-6; a different layer, padding or activation does not
# (QuickGELU instead of GELU moves even a random 1-layer tower by ~7e-3).
EMPTY_CONTEXT_RTOL = 1e-3


class LatentsMismatchError(UserError, ValueError):
    """Latent shards made with a different VAE or text encoder than the configured model's."""


# --------------------------------------------------------------------------------------- identity


def module_identity(module: nn.Module, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a frozen part: class, weight fingerprint, behaviour-changing attributes, config.

    The config is recorded for people; only class, fingerprint and attributes are compared.
    """
    attributes = {name: getattr(module, name) for name in IDENTITY_ATTRIBUTES if hasattr(module, name)}
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "fingerprint": fingerprint(module),
        "attributes": attributes,
        "config": dict(config) if config is not None else None,
    }


def latents_metadata(
    autoencoder: nn.Module,
    conditioner: nn.Module,
    store: str,
    image_size: int,
    context_dtype: str,
    configs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``__meta__.json`` shared by every shard of one precompute run (``source`` added per shard)."""
    configs = configs or {}
    latent_side = image_size // autoencoder.downsampling_factor
    return {
        "format": FORMAT,
        "store": store,
        "image_size": image_size,
        "center_crop": True,
        "latent_shape": [autoencoder.latent_channels, latent_side, latent_side],
        "context_shape": [conditioner.max_length, conditioner.context_dim],
        "context_dtype": context_dtype,
        "scaling_factor": autoencoder.scaling_factor,
        "autoencoder": module_identity(autoencoder, configs.get("autoencoder")),
        "conditioner": module_identity(conditioner, configs.get("conditioner")),
    }


def _compared(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {key: identity.get(key) for key in ("class", "fingerprint", "attributes")}


def same_dataset(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """None if two shard metas describe the same latents (source aside), else the first difference."""
    for key in ("format", "store", "image_size", "latent_shape", "context_shape", "scaling_factor"):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)} vs {b.get(key)}"
    for part in ("autoencoder", "conditioner"):
        if _compared(a[part]) != _compared(b[part]):
            return f"{part} {a[part]['fingerprint']} vs {b[part]['fingerprint']}"
    return None


def check_latents_match(
    meta: Mapping[str, Any],
    autoencoder: nn.Module,
    conditioner: nn.Module,
    empty_context: np.ndarray | None = None,
) -> None:
    """Raise ``LatentsMismatchError`` (one line) unless the shards' ``meta`` was made by these frozen parts.

    Compares weight fingerprints, behaviour-changing attributes and the scaling factor; with
    ``empty_context`` (the stored float32 context of "", (L, D)) also recomputes it in float32,
    which catches text encoder options the weights do not show (layer, padding, activation).
    """
    for name, module in (("autoencoder", autoencoder), ("conditioner", conditioner)):
        recorded, actual = meta[name], module_identity(module)
        if recorded["fingerprint"] != actual["fingerprint"]:
            raise LatentsMismatchError(
                f"latent shards were made with a different {name} (fingerprint {recorded['fingerprint']}, "
                f"model.{name} is {actual['fingerprint']}): precompute them again with this model"
            )
        for key, value in actual["attributes"].items():
            if recorded["attributes"].get(key) != value:
                raise LatentsMismatchError(
                    f"latent shards were made with {name}.{key}={recorded['attributes'].get(key)}, "
                    f"model.{name} has {value}: precompute them again with this model"
                )
    if not math.isclose(meta["scaling_factor"], autoencoder.scaling_factor, rel_tol=1e-6):
        raise LatentsMismatchError(
            f"latent shards were scaled by {meta['scaling_factor']}, model.autoencoder.scaling_factor "
            f"is {autoencoder.scaling_factor}: set it to match or precompute again"
        )
    if empty_context is not None:
        device = next(conditioner.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            actual = conditioner([""])[0].float().cpu()  # (L, D)
        stored = torch.from_numpy(empty_context.astype(np.float32))
        error = ((actual - stored).norm() / stored.norm().clamp_min(1e-12)).item()
        if actual.shape != stored.shape or error > EMPTY_CONTEXT_RTOL:
            raise LatentsMismatchError(
                f"model.conditioner encodes the empty prompt differently from the one that made the latent "
                f"shards (relative error {error:.3g}; layer, padding or activation differ): precompute again"
            )


# ----------------------------------------------------------------------------------- shard members


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` to bytes (a ``.npy`` member)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_shard_meta(url: str) -> tuple[dict[str, Any], np.ndarray]:
    """(``__meta__.json`` as a dict, empty-prompt context (L, D)) of a latent shard: its first sample."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
    first = next(iter(pipeline), None)
    if first is None or first["__key__"] != META_KEY:
        raise LatentsMismatchError(
            f"{url} is not a latent shard (no {META_KEY} sample first): make latent shards with "
            "data_scripts/precompute_latents.py"
        )
    return json.loads(first["json"]), npy_load(first["empty_context.npy"])


# ------------------------------------------------------------------------------------------ writing


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
            for raw in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
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


class _AtomicTar:
    """A tar written under a hidden temporary name beside ``path``, renamed to it by ``commit``."""

    def __init__(self, path: Path):
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.path, self.temp = path, Path(temp)
        self.file = os.fdopen(fd, "wb")
        self.tar = wds.TarWriter(self.file, mtime=TAR_MTIME)

    def write(self, sample: dict[str, Any]) -> None:
        self.tar.write(sample)

    def commit(self) -> None:
        self.tar.close()  # end-of-archive blocks; our file stays open
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.temp, 0o644)  # mkstemp makes it private; datasets are shared
        os.replace(self.temp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _shard_seed(seed: int, name: str) -> int:
    """The noise seed of one output shard (store="sample"): fixed by the run seed and the shard name."""
    return seed * 2**32 + zlib.crc32(name.encode())


class _Encoder:
    """Image and caption batches -> the per-sample members of latent shards, on ``device``."""

    def __init__(
        self,
        autoencoder: nn.Module,
        conditioner: nn.Module,
        store: str,
        context_dtype: str,
        device: torch.device,
    ):
        self.autoencoder = autoencoder
        self.conditioner = conditioner
        self.store = store
        self.context_dtype = CONTEXT_DTYPES[context_dtype]
        self.device = device

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
        with torch.autocast(self.device.type, enabled=False):  # the VAE in fp32: half precision overflows
            posterior = self.autoencoder.encode(images.float())
        mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()  # (B, C, h, w)
        if self.store == "sample":
            # z = mean + std * eps, eps drawn on the CPU: the same on every device
            eps = torch.randn(mean.shape, generator=generator)
            tensors = {"latent.npy": (self.autoencoder.scaling_factor * (mean + torch.exp(0.5 * logvar) * eps)).numpy()}
        else:
            tensors = {"mean.npy": mean.numpy(), "logvar.npy": logvar.numpy()}
        context = self.context(batch["caption"])  # (B, L, D)
        samples = []
        for i, key in enumerate(batch["key"]):
            sample = {"__key__": key, "txt": batch["caption"][i], "context.npy": npy_bytes(context[i])}
            sample.update({name: npy_bytes(array[i]) for name, array in tensors.items()})
            if batch["json"][i] is not None:
                sample["json"] = batch["json"][i]
            samples.append(sample)
        return samples


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
    meta = latents_metadata(autoencoder, conditioner, store, image_size, context_dtype, configs)
    autoencoder.to(device).eval()
    conditioner.to(device).eval()
    encoder = _Encoder(autoencoder, conditioner, store, context_dtype, device)
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
    open_tars: dict[int, tuple[_AtomicTar, torch.Generator]] = {}
    bar = tqdm(total=len(pending), desc=f"latents rank {rank}/{world_size}", unit="shard", disable=not progress)
    try:
        for index, batch in loader:
            job = jobs[index]
            if index not in open_tars:
                tar = _AtomicTar(job.output)
                tar.write({"__key__": META_KEY, "json": json.dumps({**meta, "source": job.source}),
                           "empty_context.npy": empty_context})
                open_tars[index] = (tar, torch.Generator().manual_seed(_shard_seed(seed, job.output.name)))
            tar, generator = open_tars[index]
            if "dropped" in batch:  # the input shard is done
                report.dropped.update(batch["dropped"])
                tar.commit()
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


# ------------------------------------------------------------------------------------------ reading


class _MetaCheck:
    """Pipeline stage: drop each shard's ``__meta__`` sample after checking it matches ``expected``."""

    def __init__(self, expected: Mapping[str, Any]):
        self.expected = expected

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        url = None
        for sample in samples:
            if sample["__key__"] == META_KEY:
                difference = same_dataset(json.loads(sample["json"]), self.expected)
                if difference is not None:
                    raise LatentsMismatchError(f"{sample['__url__']} differs from the first latent shard: {difference}")
                url = sample["__url__"]
                continue
            if sample["__url__"] != url:
                raise LatentsMismatchError(f"{sample['__url__']} is not a latent shard (no {META_KEY} sample first)")
            yield sample


class ToLatentSample:
    """A raw latent-shard sample -> {"latent": (C,h,w) scaled, "context": (L,D) float32, "caption": str}.

    store="distribution": z = mean + exp(logvar / 2) * eps, a fresh eps each time in training and one
    fixed by the sample key in validation; latent = scaling_factor * z.
    caption_dropout: probability of replacing the context by the empty prompt's (and the caption by
    ""), as ``LatentDiffusion.drop_captions`` does for images (its ``encode_batch`` passes
    precomputed contexts through untouched).
    """

    def __init__(self, meta: Mapping[str, Any], empty_context: np.ndarray, train: bool, caption_dropout: float = 0.0):
        self.store = meta["store"]
        self.scaling_factor = float(meta["scaling_factor"])
        self.empty_context = torch.from_numpy(empty_context.astype(np.float32))  # (L, D)
        self.train = train
        self.caption_dropout = caption_dropout if train else 0.0

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.store == "sample":
            latent = torch.from_numpy(npy_load(sample["latent.npy"]).astype(np.float32))
        else:
            mean = torch.from_numpy(npy_load(sample["mean.npy"]).astype(np.float32))  # (C, h, w)
            std = torch.exp(0.5 * torch.from_numpy(npy_load(sample["logvar.npy"]).astype(np.float32)))
            generator = None if self.train else torch.Generator().manual_seed(zlib.crc32(sample["__key__"].encode()))
            latent = self.scaling_factor * (mean + std * torch.randn(mean.shape, generator=generator))
        context = torch.from_numpy(npy_load(sample["context.npy"]).astype(np.float32))  # (L, D)
        caption = sample.get("txt", b"").decode("utf-8")
        if self.caption_dropout > 0 and torch.rand(()).item() < self.caption_dropout:
            context, caption = self.empty_context, ""
        return {"latent": latent, "context": context, "caption": caption}


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latent": torch.stack([s["latent"] for s in samples]),  # (B, C, h, w)
        "context": torch.stack([s["context"] for s in samples]),  # (B, L, D)
        "caption": [s["caption"] for s in samples],
    }


def latent_pipeline(
    urls: list[str],
    meta: Mapping[str, Any],
    empty_context: np.ndarray,
    batch_size: int,
    train: bool,
    shuffle_buffer: int = 1000,
    caption_dropout: float = 0.0,
) -> wds.DataPipeline:
    """Latent shards -> batches; training reads resampled shards forever, validation each shard once
    (split across ranks and workers), as ``image_caption_pipeline`` does for images."""
    if train:
        source = [wds.ResampledShards(urls)]
    else:
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    return wds.DataPipeline(
        *source,
        wds.tarfile_to_samples(),
        _MetaCheck(meta),
        *([wds.shuffle(shuffle_buffer)] if train and shuffle_buffer > 1 else []),
        wds.map(ToLatentSample(meta, empty_context, train, caption_dropout)),
        wds.batched(batch_size, collation_fn=collate_latents, partial=not train),
    )


class LatentShardDataModule(pl.LightningDataModule):
    """Precomputed latent shards (``data_scripts/precompute_latents.py``) for training and validation.

    Batches are {"latent": (B,C,h,w) scaled, "context": (B,L,D) float32, "caption": list[str]}, which
    ``LatentDiffusion.encode_batch`` passes straight to the U-Net: no VAE or text encoder runs.
    image_size: the image size the latents were made at (the task's sampling size); checked.
    check_model: at ``setup``, check the shards were made by the VAE and text encoder of the model
        being trained (``trainer.lightning_module.autoencoder`` / ``.conditioner``).
    caption_dropout: see ``ToLatentSample``; the config sets it to ``task.caption_dropout``.
    """

    def __init__(
        self,
        shards: str | list[str],
        image_size: int,
        val_shards: str | list[str] | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        caption_dropout: float = 0.0,
        check_model: bool = True,
    ):
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.shards = shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.caption_dropout = caption_dropout
        self.check_model = check_model

    def setup(self, stage: str | None = None) -> None:
        self.train_urls = expand_shards(self.shards)
        self.val_urls = expand_shards(self.val_shards) if self.val_shards else []
        # the first shard is read here; every other one is checked against it as it streams by
        self.meta, self.empty_context = read_shard_meta(self.train_urls[0])
        if self.val_urls:
            difference = same_dataset(read_shard_meta(self.val_urls[0])[0], self.meta)
            if difference is not None:
                raise LatentsMismatchError(f"validation and training latent shards differ: {difference}")
        if self.meta["image_size"] != self.image_size:
            raise LatentsMismatchError(
                f"data.image_size={self.image_size} but the latent shards were made at {self.meta['image_size']} px"
            )
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.check_model and module is not None and hasattr(module, "autoencoder"):
            check_latents_match(self.meta, module.autoencoder, module.conditioner, self.empty_context)

    def _loader(self, pipeline: wds.DataPipeline, num_workers: int) -> wds.WebLoader:
        return wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> wds.WebLoader:
        pipeline = latent_pipeline(
            self.train_urls, self.meta, self.empty_context, self.batch_size, True, self.shuffle_buffer,
            self.caption_dropout,
        )
        return self._loader(pipeline, self.num_workers)

    def val_dataloader(self) -> wds.WebLoader | list:
        if not self.val_urls:
            return []
        pipeline = latent_pipeline(self.val_urls, self.meta, self.empty_context, self.val_batch_size, False)
        # never more workers than shards: webdataset refuses workers with no shard to read
        return self._loader(pipeline, min(self.num_workers, len(self.val_urls)))
