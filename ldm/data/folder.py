"""Training straight from a folder of captioned images (the sets fine-tuners bring: tens to ~100k images).

Two conventions (subfolders allowed in both):
- ``x.jpg`` with its caption in ``x.txt`` beside it (kohya, EveryDream); an image without one has an
  empty caption (``data.empty_captions`` decides);
- a ``metadata.jsonl`` or ``metadata.csv`` at the top of the folder with a ``file_name`` column (the
  path relative to the folder) and a caption column, ``text`` or ``caption`` (Hugging Face
  ``imagefolder``); a JSONL caption may be a list, one drawn each time the image is used. Only the
  listed images are used. Metadata is hostile: a ``file_name`` that resolves outside the folder
  (``../``, an absolute path, a symlink out) is refused and counted (``unsafe_path``).

The folder is indexed once per process (sorted, so every rank holds the same index); with buckets each
image's header (not its pixels) is read then to assign its bucket. Every epoch is a plan computed from
(seed, epoch) alone: the items (each ``repeats`` times) are shuffled, grouped by bucket, cut into
batches (each bucket's last batch filled up from its start, so every batch is full and every image
seen), the batches shuffled and their count padded to a multiple of the world size, and batch i goes
to rank i mod world_size. So every rank runs the same number of steps, and resuming at batch k of an
epoch starts at batch k of the plan without decoding any before it (with any number of loader workers). An image that fails to decode is counted and
replaced by another of its bucket, drawn from the batch's own seed, so batches stay full and a
resumed stream stays identical. Files refused while indexing are counted once per epoch (rank 0).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset

from ldm.data.buckets import BUCKET_KEY, Bucket, nearest_bucket, upright_size
from ldm.data.decode import IMAGE_EXTENSIONS
from ldm.data.samples import collate
from ldm.data.seeds import PROCESS, stream_seed
from ldm.data.skips import (
    CORRUPT_IMAGE,
    CORRUPT_METADATA,
    COUNTS_KEY,
    ERROR,
    MISSING_FILE,
    NO_IMAGE,
    OVERSIZED_FILE,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    UNSAFE_PATH,
    DataCounts,
    FilteredOut,
    SkipSample,
)
from ldm.data.streams import StreamStart, batches_by_shape, worker_position
from ldm.errors import UserError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")  # tried in order when data.caption_column is null
MAX_FILE_BYTES = 256 << 20  # larger image files are refused unread (oversized_file)
# seed streams of the folder plan (beside those of ldm.data.streams)
PLAN = 10
# this many failed images in a row while filling one batch slot mean the folder is unusable
MAX_REPLACEMENTS = 100
HEADER_THREADS = 8  # images whose headers are read at once while indexing (I/O bound)


class FolderError(UserError):
    """A folder that cannot be trained on (missing, empty, every image refused)."""


@dataclass
class FolderIndex:
    """The usable images of a folder: paths relative to ``root`` (POSIX), their captions (None: read
    ``x.txt`` beside the image; else the metadata's value), upright sizes (when read) and their bucket
    index, and the files refused while indexing as (reason, where, detail)."""

    root: str
    paths: list[str] = field(default_factory=list)
    captions: list[Any] = field(default_factory=list)
    sizes: list[tuple[int, int]] | None = None
    buckets: np.ndarray | None = None  # (N,) int32 bucket of each image; None: one bucket
    problems: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: Sequence[int], problems: bool = True) -> FolderIndex:
        return FolderIndex(
            self.root,
            [self.paths[i] for i in keep],
            [self.captions[i] for i in keep],
            None if self.sizes is None else [self.sizes[i] for i in keep],
            None if self.buckets is None else self.buckets[np.asarray(keep, dtype=np.int64)],
            list(self.problems) if problems else [],
        )

    def bucket_of(self) -> np.ndarray:
        return self.buckets if self.buckets is not None else np.zeros(len(self.paths), dtype=np.int32)


# ---------------------------------------------------------------------- indexing
def index_folder(path: str | os.PathLike, caption_column: str | None = None) -> FolderIndex:
    """Index ``path`` (see the module docstring); raises ``FolderError`` for a missing folder."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FolderError(f"data.path {str(path)!r} is not a folder")
    found = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(found) > 1:
        raise FolderError(f"{root} holds both metadata.jsonl and metadata.csv: keep one")
    index = FolderIndex(str(root))
    if found:
        rows = _jsonl_rows(found[0], index) if found[0].suffix == ".jsonl" else _csv_rows(found[0], index)
        for where, row in rows:
            _add_metadata_row(index, root, where, row, caption_column)
    else:
        for relative in _image_files(root):
            index.paths.append(relative)
            index.captions.append(None)
    return index


def _image_files(root: Path) -> list[str]:
    """Image files under ``root`` (relative POSIX paths, sorted), hidden files and folders left out."""
    found = []
    for directory, folders, files in os.walk(root, followlinks=True):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in files:
            if not name.startswith(".") and _extension(name) in IMAGE_EXTENSIONS:
                found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _jsonl_rows(path: Path, index: FolderIndex) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                where = f"{path.name}:{number}"
                try:
                    yield where, json.loads(line)
                except ValueError as error:
                    index.problems.append((CORRUPT_METADATA, where, str(error)[:200]))


def _csv_rows(path: Path, index: FolderIndex) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as file:
        for number, row in enumerate(csv.DictReader(file), start=2):  # line 1 is the header
            yield f"{path.name}:{number}", row


def _add_metadata_row(index: FolderIndex, root: Path, where: str, row: Any, caption_column: str | None) -> None:
    name = row.get("file_name") if isinstance(row, dict) else None
    if not isinstance(name, str) or not name:
        index.problems.append((CORRUPT_METADATA, where, "no file_name"))
        return
    try:
        resolved = (root / name).resolve()
        inside = resolved.is_relative_to(root) and resolved != root
    except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
        inside = False
    if not inside:
        index.problems.append((UNSAFE_PATH, where, f"file_name {name[:200]!r} is outside the folder"))
        return
    if _extension(resolved.name) not in IMAGE_EXTENSIONS:
        index.problems.append((NO_IMAGE, where, f"{name[:200]!r} is not a {'/'.join(IMAGE_EXTENSIONS)} file"))
        return
    columns = [caption_column] if caption_column else CAPTION_COLUMNS
    caption = next((row[c] for c in columns if row.get(c) is not None), "")
    index.paths.append(resolved.relative_to(root).as_posix())
    index.captions.append(caption)


def check_files(index: FolderIndex, read_sizes: bool, max_pixels: int | None) -> FolderIndex:
    """Drop (and record) missing and oversized files; with ``read_sizes``, read each image's upright
    size from its header (threads: this is I/O) and drop unreadable headers and pixel bombs."""
    root = Path(index.root)
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        results = list(pool.map(lambda p: _check_file(root / p, read_sizes, max_pixels), index.paths))
    keep, sizes = [], []
    for i, result in enumerate(results):
        if isinstance(result, tuple) and isinstance(result[0], str):
            index.problems.append((result[0], index.paths[i], result[1]))
            continue
        keep.append(i)
        sizes.append(result)
    checked = index.subset(keep)
    checked.sizes = sizes if read_sizes else None
    return checked


def _check_file(path: Path, read_size: bool, max_pixels: int | None) -> tuple[Any, Any] | None:
    """(width, height), None (not read), or (reason, detail) for a file to refuse."""
    try:
        size = path.stat().st_size
    except OSError as error:
        return MISSING_FILE, f"{type(error).__name__}: {error}"[:200]
    if size > MAX_FILE_BYTES:
        return OVERSIZED_FILE, f"{size} bytes > {MAX_FILE_BYTES}"
    if not read_size:
        return None
    try:
        with Image.open(path) as image:
            width, height = upright_size(image)
    except Image.DecompressionBombError as error:
        return TOO_MANY_PIXELS, str(error)[:200]
    except Exception as error:  # noqa: BLE001 - not an image, truncated header, ...
        return CORRUPT_IMAGE, f"{type(error).__name__}: {error}"[:200]
    if max_pixels is not None and width * height > max_pixels:
        return TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels} pixels"
    return width, height


def assign_buckets(index: FolderIndex, buckets: Sequence[Bucket], no_upscale: bool) -> FolderIndex:
    """Each image's bucket from its size (``nearest_bucket``); with ``no_upscale`` an image covering
    no bucket is dropped as ``too_small``. Needs ``check_files(read_sizes=True)`` first."""
    assert index.sizes is not None, "assign_buckets needs the sizes (check_files(read_sizes=True))"
    keep, assigned = [], []
    for i, (width, height) in enumerate(index.sizes):
        bucket = nearest_bucket(width, height, buckets, no_upscale)
        if bucket is None:
            index.problems.append((TOO_SMALL, index.paths[i], f"{width}x{height} is smaller than every bucket"))
            continue
        keep.append(i)
        assigned.append(bucket)
    result = index.subset(keep)
    result.buckets = np.asarray(assigned, dtype=np.int32)
    return result


def split_validation(index: FolderIndex, fraction: float) -> tuple[FolderIndex, FolderIndex]:
    """(training, validation) indexes: the round(fraction x N) images (at least one, when fraction > 0)
    whose path hashes lowest go to validation. Independent of the seed and of the other files, so an
    image stays on its side when the seed changes or images are added."""
    if not 0 <= fraction < 1:
        raise FolderError(f"data.val_fraction must be in [0, 1), not {fraction}")
    count = min(len(index) - 1, max(1, round(fraction * len(index)))) if fraction > 0 else 0
    order = sorted(range(len(index)), key=lambda i: hashlib.sha1(index.paths[i].encode()).digest())
    val = set(order[:count])
    train = index.subset([i for i in range(len(index)) if i not in val])
    return train, index.subset(sorted(val), problems=False)


def load_raw(index: FolderIndex, item: int) -> dict[str, Any]:
    """Image ``item`` as a raw sample, as a shard would hold it: {"__key__", "__url__", "<ext>": bytes,
    "txt" (the caption file) or "json" ({"caption": the metadata's value}), "__bucket__"}."""
    relative = index.paths[item]
    path = Path(index.root, relative)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SkipSample(MISSING_FILE, f"{type(error).__name__}: {error}") from None
    raw: dict[str, Any] = {"__key__": relative, "__url__": index.root, _extension(relative): data}
    caption = index.captions[item]
    if caption is None:
        try:
            raw["txt"] = path.with_suffix(".txt").read_bytes()
        except OSError:
            pass  # no caption: the caption picker applies data.empty_captions
    else:
        raw["json"] = json.dumps({"caption": caption}).encode()
    if index.buckets is not None:
        raw[BUCKET_KEY] = int(index.buckets[item])
    return raw


# ---------------------------------------------------------------------- the epoch plan
def epoch_plan(
    bucket_of: np.ndarray, batch_size: int, world_size: int, repeats: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The epoch's batches (arrays of item indices) over all ranks, a multiple of ``world_size`` of
    them; rank r trains on batches r, r + world_size, ... (see the module docstring)."""
    rng = np.random.default_rng(stream_seed(seed, PLAN, epoch))
    batches: list[np.ndarray] = []
    for bucket in np.unique(bucket_of):
        items = np.repeat(np.flatnonzero(bucket_of == bucket), repeats)  # (n x repeats,)
        items = items[rng.permutation(len(items))]
        count = math.ceil(len(items) / batch_size)
        items = np.resize(items, count * batch_size)  # the last batch filled up from the start
        batches.extend(items.reshape(count, batch_size))
    order = rng.permutation(len(batches))
    total = math.ceil(len(batches) / world_size) * world_size
    return [batches[order[i % len(batches)]] for i in range(total)]


def batches_per_rank(bucket_of: np.ndarray, batch_size: int, world_size: int, repeats: int) -> int:
    """Batches each rank trains on per epoch (``epoch_plan``'s length / world_size, for any epoch)."""
    per_bucket = np.unique(bucket_of, return_counts=True)[1]
    total = sum(math.ceil(int(n) * repeats / batch_size) for n in per_bucket)
    return math.ceil(total / world_size)


# ---------------------------------------------------------------------- the stream
class FolderStream(IterableDataset):
    """Batches {"image", "caption", "key", "skipped"} from a ``FolderIndex``, per rank and loader worker.

    to_sample: raw sample (``load_raw``), rng -> training sample (``ToTrainingSample``, or
        ``BucketedSample`` when the index has buckets), raising ``SkipSample``/``FilteredOut``.
    train: the epoch plan (shuffled by (seed, epoch), ``repeats``, full batches, equal counts per
        rank, exact resume from ``start`` (epoch, batches done) as ``TrainingLoader`` sets it);
        else validation: each image once, in index order, split across ranks then workers, the last
        partial batch of each bucket kept.
    """

    def __init__(
        self,
        index: FolderIndex,
        to_sample: Callable[[dict[str, Any], random.Random], dict[str, Any]],
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        repeats: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if not len(index):
            raise FolderError(f"no usable image in {index.root}{problem_summary(index.problems)}")
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"batch_size and repeats must be positive, not {batch_size}, {repeats}")
        self.index = index
        self.to_sample = to_sample
        self.batch_size = batch_size
        self.train = train
        self.seed = seed if seed is not None else 0
        self.repeats = repeats
        self.start = StreamStart()
        self.rank = rank
        self.world_size = world_size
        self.counts = DataCounts()

    def batches_per_rank(self, world_size: int) -> int:
        return batches_per_rank(self.index.bucket_of(), self.batch_size, world_size, self.repeats)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size, worker, num_workers = worker_position(self.rank, self.world_size)
        if not self.train:
            items = range(len(self.index))[rank::world_size][worker::num_workers]
            samples = (s for s in (self._sample(i, random.Random(stream_seed(self.seed, i))) for i in items) if s)
            return batches_by_shape(samples, self.batch_size, True, self._collate)
        return self._training_batches(rank, world_size, worker, num_workers)

    def _training_batches(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        if rank == 0 and worker == 0 and self.start.done == 0:
            for reason, where, detail in self.index.problems:  # refused while indexing: once per epoch
                self.counts.skip(reason, f"{self.index.root}:{where}", detail)
        for number in self.worker_numbers(world_size, worker, num_workers):
            yield self.plan_batch(self.start.epoch, number, rank, world_size)

    def worker_numbers(self, world_size: int, worker: int, num_workers: int) -> range:
        """The numbers (within this rank's share of the epoch) of the batches this loader worker makes.

        The loader takes batches from its workers in turn, starting with worker 0: worker w makes
        batches done + w, done + w + num_workers, ... (nothing before ``done`` is read or decoded)."""
        return range(self.start.done + worker, self.batches_per_rank(world_size), num_workers)

    def plan_batch(self, epoch: int, number: int, rank: int, world_size: int) -> dict[str, Any]:
        """Batch ``number`` of rank ``rank``'s share of ``epoch``'s plan: a function of (seed, epoch,
        number) alone, so any stream can be resumed (or paired with another, ``PairedStream``) exactly."""
        cached = self.__dict__.get("_plan")
        if cached is None or cached[:2] != (epoch, world_size):
            plan = epoch_plan(self.index.bucket_of(), self.batch_size, world_size, self.repeats, self.seed, epoch)
            cached = self.__dict__["_plan"] = (epoch, world_size, plan)
        global_number = number * world_size + rank  # the batch's place in the epoch plan
        rng = random.Random(stream_seed(self.seed, PROCESS, epoch, global_number))
        bucket_of = self.index.bucket_of()
        return self._collate([self._filled(int(item), bucket_of, rng) for item in cached[2][global_number]])

    def _filled(self, item: int, bucket_of: np.ndarray, rng: random.Random) -> dict[str, Any]:
        """The sample of ``item``, or, if it fails, of another image of its bucket drawn by ``rng``."""
        candidates = None
        for _ in range(MAX_REPLACEMENTS):
            sample = self._sample(item, rng)
            if sample is not None:
                return sample
            if candidates is None:
                candidates = np.flatnonzero(bucket_of == bucket_of[item])
            item = int(candidates[rng.randrange(len(candidates))])
        reason, where, detail = self.counts.last_skip
        raise FolderError(
            f"{MAX_REPLACEMENTS} images in a row of {self.index.root} failed; last: {where}: {reason} {detail}"
        )

    def _sample(self, item: int, rng: random.Random) -> dict[str, Any] | None:
        where = f"{self.index.root}:{self.index.paths[item]}"
        try:
            return self.to_sample(load_raw(self.index, item), rng)
        except SkipSample as skip:
            self.counts.skip(skip.reason, where, skip.detail)
        except FilteredOut as rejected:
            self.counts.filtered(rejected.name)
        except Exception as error:  # noqa: BLE001 - one odd image must not end a run
            self.counts.skip(ERROR, where, f"{type(error).__name__}: {error}")
        return None

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples)
        batch[COUNTS_KEY] = self.counts.take()
        return batch


def problem_summary(problems: list[tuple[str, str, str]]) -> str:
    if not problems:
        return ""
    reasons: dict[str, int] = {}
    for reason, _, _ in problems:
        reasons[reason] = reasons.get(reason, 0) + 1
    listed = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    reason, where, detail = problems[-1]
    return f" ({len(problems)} refused: {listed}; last: {where}: {detail})"
