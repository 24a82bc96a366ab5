"""Image sets for evaluation: folders of samples and webdataset shards, read as uint8 batches.

A folder is read as ``sample.py`` writes it (the files its ``metadata.jsonl`` lists, in order) or,
without metadata, as every image file below it; shards give every image member. Images decode to
RGB with PIL, ``num_threads`` at a time, and stack into (B, H, W, 3) uint8 batches (a change of
image size starts a new batch); ``rebatch`` turns any such stream into (B, 3, H, W) tensors of one
batch size. Rank r of W reads images r, r + W, ...
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.data.decode import IMAGE_EXTENSIONS, SOURCE_IMAGE_SUFFIXES
from ldm.data.shard_reader import read_shard
from ldm.data.shards import expand_shards
from ldm.data.skips import DataCounts
from ldm.errors import UserError
from ldm.jsonl import jsonl_rows

IMAGE_SUFFIXES = SOURCE_IMAGE_SUFFIXES  # image files of a folder set

ImageBatch = np.ndarray | Tensor  # uint8: (B, H, W, 3) numpy or (B, 3, H, W) torch


def as_image_tensor(batch: ImageBatch) -> Tensor:
    """A uint8 batch as (B, 3, H, W): numpy arrays are (B, H, W, 3), tensors already (B, 3, H, W)."""
    if isinstance(batch, np.ndarray):
        if batch.ndim != 4 or batch.shape[3] != 3:
            raise ValueError(f"expected numpy images of shape (B, H, W, 3), got {batch.shape}")
        batch = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    elif not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if hasattr(batch, "shape") else type(batch).__name__
        raise ValueError(f"expected image tensors of shape (B, 3, H, W), got {shape}")
    if batch.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}")
    return batch


def rebatch(batches: Iterable[ImageBatch], batch_size: int) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches of ``batch_size`` (fewer at the end, or where the image size changes)."""
    pending: list[Tensor] = []
    count = 0
    for batch in batches:
        images = as_image_tensor(batch)
        if pending and images.shape[1:] != pending[0].shape[1:]:
            yield torch.cat(pending)
            pending, count = [], 0
        while len(images):
            take, images = images[: batch_size - count], images[batch_size - count :]
            pending.append(take)
            count += len(take)
            if count == batch_size:
                yield torch.cat(pending)
                pending, count = [], 0
    if pending:
        yield torch.cat(pending)


def read_metadata(folder: str | Path) -> list[dict[str, Any]] | None:
    """The rows of ``folder/metadata.jsonl`` (each with a ``file``), or None without one."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        return None
    rows = []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict) or "file" not in row:
            raise UserError(f"{path}:{number}: each line needs a 'file'")
        rows.append(row)
    return rows


def folder_images(folder: str | Path) -> list[Path]:
    """The images of a folder: those listed in its ``metadata.jsonl`` (in order), else every image
    file below it (sorted; a ``grid.png`` preview would be included, so keep the metadata)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"no such image folder: {folder}")
    rows = read_metadata(folder)
    if rows is not None:
        paths = [folder / row["file"] for row in rows]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            listed = folder / "metadata.jsonl"
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {listed} are missing, e.g. {missing[0]}")
    else:
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"no images in {folder}")
    return paths


def _decode_rgb(data: Path | bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file or its encoded bytes."""
    with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _stack_runs(images: list[np.ndarray]) -> Iterator[np.ndarray]:
    """(B, H, W, 3) stacks of consecutive images of one size, in order."""
    start = 0
    for end in range(1, len(images) + 1):
        if end == len(images) or images[end].shape != images[start].shape:
            yield np.stack(images[start:end])
            start = end


def read_images(sources: Iterable[Path | bytes], batch_size: int = 50, num_threads: int = 4) -> Iterator[np.ndarray]:
    """Decode image files (or encoded bytes) in order into uint8 (B, H, W, 3) batches, a batch's
    images decoded by ``num_threads`` threads; a change of image size starts a new batch."""
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        chunk: list[Path | bytes] = []
        for source in sources:
            chunk.append(source)
            if len(chunk) == batch_size:
                yield from _stack_runs(list(pool.map(_decode_rgb, chunk)))
                chunk = []
        if chunk:
            yield from _stack_runs(list(pool.map(_decode_rgb, chunk)))


def _shard_image_bytes(urls: Sequence[str], rank: int, world_size: int) -> Iterator[bytes]:
    """The encoded image of each sample of tar shards, in order (read by ``ldm.data.shard_reader``:
    member size caps, timeouts); rank r of W keeps images r, r + W, ... A shard that cannot be read
    whole is an error, not a skip: the statistics of an incomplete set do not compare."""
    counts, index = DataCounts(), 0
    for url in urls:
        for sample in read_shard(url, counts):
            extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if extension is None:
                continue
            if index % world_size == rank:
                yield sample[extension]
            index += 1
        problems = counts.take()
        if problems:
            reason, where, detail = counts.last_skip
            raise UserError(f"{where or url}: {reason.replace('_', ' ')} ({detail}): the image set would be incomplete")


@dataclass(frozen=True)
class ImageSet:
    """A folder of images or webdataset shards, read as uint8 (B, H, W, 3) batches.

    ``spec`` is a folder (``metadata.jsonl`` aware, see ``folder_images``) or a shard spec
    (``expand_shards``: brace patterns, globs, lists). Rank r of W reads images r, r + W, ...
    ``len`` is this rank's image count for folders, None for shards (known only once read).
    """

    spec: str
    batch_size: int = 50
    rank: int = 0
    world_size: int = 1
    num_threads: int = 4

    @property
    def is_folder(self) -> bool:
        return Path(self.spec).expanduser().is_dir()

    @property
    def source(self) -> str:
        """What the set is, for cache files: the resolved folder or the shard spec."""
        return str(Path(self.spec).expanduser().resolve()) if self.is_folder else self.spec

    def paths(self) -> list[Path]:
        return folder_images(self.spec)[self.rank :: self.world_size]

    def count(self) -> int | None:
        return len(self.paths()) if self.is_folder else None

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.is_folder:
            sources: Iterable[Path | bytes] = self.paths()
        else:
            sources = _shard_image_bytes(expand_shards(self.spec), self.rank, self.world_size)
        return read_images(sources, self.batch_size, self.num_threads)
