"""Image-caption corpora (a folder with sidecar captions, or a CSV/TSV/JSONL table) -> webdataset shards.

Each sample is stored as ``{key}.{jpg|png|webp}``, ``{key}.txt`` (the caption) and ``{key}.json``
(``width``, ``height`` of the stored image, ``original_width``, ``original_height``, ``source``, and
any extra table columns). The key is the input's position (``%09d``), so a sample traces back to
its row or file, and keys stay stable when other inputs are skipped.

Encoding: JPEG, PNG and WebP files are stored byte for byte (no generation loss, no work), unless
they need a change: larger than ``max_side`` (downscaled, aspect kept) or rotated by an EXIF
orientation tag (turned upright, so that every reader, not only our loader, sees upright pixels
and the `.json` size matches them). Those, and every other format (BMP, TIFF, GIF, ...),
are re-encoded as RGB JPEG at quality 95; transparency is composited on white, as the loader does.
The stored extension follows the sniffed format, not the file name.

Determinism: one writer, in this process, receives encoded samples in input order whatever the
number of workers, and tar headers carry a fixed mtime, so one input order gives byte-identical shards.
Atomicity: a shard is written under a hidden temporary name, fsynced, then renamed, so a name
``{prefix}-NNNNNN.tar`` always holds a complete shard; ``{prefix}.manifest.json`` is written last
and marks the whole run complete.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm import atomic
from ldm.data.decode import SOURCE_IMAGE_SUFFIXES
from ldm.data.transforms import to_rgb
from ldm.errors import UserError

# Formats stored as they are, by PIL format name -> webdataset extension (all decoded by the loader).
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 95
EXIF_ORIENTATION = 0x0112
TAR_MTIME = 0  # fixed member mtime: byte-identical shards across runs (an int: a float adds PAX headers)
RESERVED_JSON_KEYS = ("width", "height", "original_width", "original_height", "source")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}

# Reasons an input is skipped, as reported in the summary.
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MISSING_CAPTION = "missing caption"
UNREADABLE_CAPTION = "unreadable caption"


@dataclass(frozen=True)
class SourceItem:
    """One input: an image file and its caption (given, or read from ``caption_file`` by a worker)."""

    index: int  # position in the input order; the sample key
    path: str | None  # where to read the image; None: the table row names none
    source: str  # what `.json` records: the path relative to the folder, or as written in the table
    caption: str | None = None  # None and no caption_file: the caption is missing
    caption_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """An input that produced no sample, and why."""

    index: int
    source: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    num_bytes: int


@dataclass
class WriteSummary:
    """What `write_shards` did: written shards, skipped inputs counted by reason, wall time."""

    out_dir: str
    prefix: str
    num_inputs: int = 0
    num_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[Skipped] = field(default_factory=list)  # the first MAX_EXAMPLES
    seconds: float = 0.0

    MAX_EXAMPLES = 20

    def add_skipped(self, skipped: Skipped) -> None:
        self.skipped[skipped.reason] += 1
        if len(self.skipped_examples) < self.MAX_EXAMPLES:
            self.skipped_examples.append(skipped)

    def line(self) -> str:
        """One-line summary, e.g. 'wrote 998 samples in 1 shard ...; skipped 2 of 1000 inputs: ...'."""
        size = sum(shard.num_bytes for shard in self.shards) / 1e6
        text = (
            f"wrote {self.num_samples} samples in {len(self.shards)} shard(s) ({size:.1f} MB) to "
            f"{self.out_dir}/{self.prefix}-*.tar in {self.seconds:.1f} s"
        )
        total_skipped = sum(self.skipped.values())
        if total_skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            text += f"; skipped {total_skipped} of {self.num_inputs} inputs: {reasons}"
        else:
            text += f"; skipped 0 of {self.num_inputs} inputs"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "num_inputs": self.num_inputs,
            "num_samples": self.num_samples,
            "shards": [vars(shard) for shard in self.shards],
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": [vars(skipped) for skipped in self.skipped_examples],
        }


# ----------------------------------------------------------------------------------------- inputs


def folder_items(root: str | os.PathLike) -> list[SourceItem]:
    """Every image under ``root`` (recursively, hidden names skipped), sorted by relative path.

    The caption of ``a/x.jpg`` is ``a/x.txt``; it is read by the worker, and its absence skips the
    image (reason 'missing caption').
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"input folder {root} does not exist")
    relative = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.suffix.lower() in SOURCE_IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    )
    return [
        SourceItem(
            index=index,
            path=str(root / name),
            source=name,
            caption_file=str((root / name).with_suffix(".txt")),
        )
        for index, name in enumerate(relative)
    ]


def _table_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV/TSV (header line required) or JSONL file, as dicts."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UserError(f"{path}: unknown table format; expected one of {', '.join(TABLE_SUFFIXES)}")
    with open(path, newline="", encoding="utf-8") as file:
        if suffix == ".jsonl":
            for number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as error:
                        raise UserError(f"{path}:{number}: not a JSON object ({error})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}:{number}: not a JSON object")
                    yield row
        else:
            yield from csv.DictReader(file, delimiter=TABLE_SUFFIXES[suffix])


def count_table_rows(path: str | os.PathLike) -> int:
    """Number of rows of a table (one parsing pass; for the progress bar)."""
    return sum(1 for _ in _table_rows(Path(path)))


def _merge_extra(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    """Table fields other than ``used``; a field named like one of ours gets a ``table_`` prefix."""
    return {
        (f"table_{name}" if name in RESERVED_JSON_KEYS else name): value
        for name, value in row.items()
        if name not in used and name is not None  # None: a CSV row's cells beyond the header
    }


def table_items(
    table: str | os.PathLike,
    root: str | os.PathLike | None = None,
    path_column: str = "path",
    caption_column: str = "caption",
) -> Iterator[SourceItem]:
    """Inputs listed in a CSV/TSV/JSONL table, in row order; streamed, so tables may be huge.

    Relative image paths resolve against ``root`` (default: the table's folder). Other columns go to
    the sample's `.json`. A missing or null caption skips the row ('missing caption'), a missing
    path likewise ('missing image'); an empty CSV cell is an empty caption (CSV cannot tell the two
    apart). A CSV/TSV header without the two columns raises.
    """
    table = Path(table)
    if not table.is_file():
        raise UserError(f"input table {table} does not exist")
    base = Path(root) if root is not None else table.parent
    for index, row in enumerate(_table_rows(table)):
        if index == 0 and table.suffix.lower() != ".jsonl":  # a CSV header names every column
            for column, option in ((path_column, "--path-column"), (caption_column, "--caption-column")):
                if column not in row:
                    raise UserError(f"{table}: no column {column!r} (see {option})")
        caption = row.get(caption_column)
        source = row.get(path_column)
        yield SourceItem(
            index=index,
            path=None if source is None else str(base / str(source)),
            source="" if source is None else str(source),
            caption=None if caption is None else str(caption),
            extra=_merge_extra(row, (path_column, caption_column)),
        )


# --------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedImage:
    extension: str  # webdataset member extension: jpg | png | webp
    data: bytes
    width: int  # of the stored image
    height: int
    original_width: int  # upright (after the EXIF orientation), before any downscale
    original_height: int


def encode_image(data: bytes, max_side: int | None = None) -> EncodedImage:
    """Image file bytes -> what to store; the image is fully decoded, so a corrupt file raises.

    Kept byte for byte when JPEG/PNG/WebP, upright and within ``max_side``; otherwise downscaled
    (longest side <= max_side, aspect kept, Lanczos) and/or turned upright, and re-encoded as
    RGB JPEG quality 95. Raises whatever PIL raises for unreadable data.
    """
    with Image.open(io.BytesIO(data)) as image:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        width, height = image.size
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        too_large = max_side is not None and max(width, height) > max_side
        if image.format in KEPT_FORMATS and orientation == 1 and not too_large:
            image.load()  # full decode: a truncated or corrupt file raises here
            return EncodedImage(KEPT_FORMATS[image.format], data, width, height, width, height)
        if too_large:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # JPEG: DCT-scaled decode
        else:
            image.load()
        rgb = to_rgb(ImageOps.exif_transpose(image))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return EncodedImage("jpg", buffer.getvalue(), rgb.width, rgb.height, *upright)


def _read_caption(item: SourceItem) -> str | Skipped:
    if item.caption is not None:
        return item.caption.strip()
    if item.caption_file is None:
        return Skipped(item.index, item.source, MISSING_CAPTION)
    try:
        return Path(item.caption_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return Skipped(item.index, item.source, MISSING_CAPTION, item.caption_file)
    except (OSError, UnicodeDecodeError) as error:
        return Skipped(item.index, item.source, UNREADABLE_CAPTION, f"{type(error).__name__}: {error}")


def make_sample(item: SourceItem, max_side: int | None = None) -> dict[str, Any] | Skipped:
    """One input -> a webdataset sample ``{__key__, jpg|png|webp, txt, json}``, or why it was skipped."""
    caption = _read_caption(item)
    if isinstance(caption, Skipped):
        return caption
    if item.path is None:
        return Skipped(item.index, item.source, MISSING_IMAGE, "no path")
    try:
        data = Path(item.path).read_bytes()
    except OSError as error:  # not found, a directory, no permission
        return Skipped(item.index, item.source, MISSING_IMAGE, f"{type(error).__name__}: {error}")
    try:
        image = encode_image(data, max_side)
    except UnidentifiedImageError:
        return Skipped(item.index, item.source, UNREADABLE_IMAGE, "not an image format PIL reads")
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return Skipped(item.index, item.source, UNREADABLE_IMAGE, f"{type(error).__name__}: {error}")
    meta = {
        **item.extra,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "source": item.source,
    }
    return {
        "__key__": f"{item.index:09d}",
        image.extension: image.data,
        "txt": caption,
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True),
    }


# ---------------------------------------------------------------------------------------- writing


class AtomicShardWriter:
    """Samples -> ``out_dir/{prefix}-NNNNNN.tar``, ``samples_per_shard`` each.

    A shard is written under ``ldm.atomic``'s hidden temporary name and renamed once closed and fsynced;
    `abort` deletes the partial shard. Use as a context manager (an exception aborts).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, samples_per_shard: int):
        import webdataset as wds  # here, so that listing and encoding do not need webdataset

        self._tar_writer = wds.TarWriter
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[ShardInfo] = []
        self._file: Any = None
        self._tar: Any = None
        self._temp: Path | None = None
        self._count = 0

    def shard_name(self, number: int) -> str:
        return f"{self.prefix}-{number:06d}.tar"

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    def close(self) -> None:
        """Publish the open shard, if any."""
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Delete the open shard's partial file, if any; published shards stay."""
        if self._tar is not None:
            with contextlib.suppress(Exception):  # e.g. a full disk: the file goes anyway
                self._tar.close()
        if self._file is not None:
            self._file.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
        self._file = self._tar = self._temp = None

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        name = self.shard_name(len(self.shards))
        self._temp = atomic.new_temporary(self.out_dir / name)
        self._file = open(self._temp, "wb")
        self._tar = self._tar_writer(self._file, mtime=TAR_MTIME)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks; leaves our file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / self.shard_name(len(self.shards))
        atomic.publish(self._temp, final)
        self.shards.append(ShardInfo(final.name, self._count, final.stat().st_size))
        self._file = self._tar = self._temp = None


def manifest_path(out_dir: str | os.PathLike, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}.manifest.json"


def existing_outputs(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Shards and manifest of an earlier run with this prefix in ``out_dir``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    shard = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    found = sorted(path for path in out_dir.iterdir() if shard.fullmatch(path.name))
    manifest = manifest_path(out_dir, prefix)
    return found + ([manifest] if manifest.exists() else [])


T = TypeVar("T")
R = TypeVar("R")


def _map_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, chunk_size: int = 16
) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes, results in input order, bounded memory.

    At most ``4 * workers`` chunks are in flight, so neither the input nor the results pile up.
    ``workers <= 1`` maps in this process. ``fn`` must be picklable (a module-level function or a
    ``functools.partial`` of one).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ProcessPoolExecutor(workers)
    try:
        pending: deque = deque()
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == chunk_size:
                pending.append(pool.submit(_map_chunk, fn, chunk))
                chunk = []
                if len(pending) >= 4 * workers:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(pool.submit(_map_chunk, fn, chunk))
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_shards(
    items: Iterable[SourceItem],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    total: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteSummary:
    """Encode ``items`` (in order) and write them as shards ``out_dir/{prefix}-NNNNNN.tar``.

    Skipped inputs are counted by reason, never fatal. With ``overwrite`` an earlier run's shards
    are replaced one by one and its extra shards deleted at the end; without it they raise. The
    manifest ``{prefix}.manifest.json`` (the summary) is written last. ``total`` sizes the bar.
    """
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise UserError("samples_per_shard must be >= 1")
    if max_side is not None and max_side < 1:
        raise UserError("max_side must be >= 1")
    if not re.fullmatch(r"[\w.-]+", prefix):
        raise UserError(f"prefix {prefix!r} must be letters, digits, '_', '-' or '.'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = existing_outputs(out_dir, prefix)
    if earlier and not overwrite:
        raise UserError(f"{out_dir} already holds {prefix}-*.tar shards (e.g. {earlier[0].name}); pass --overwrite")
    manifest_path(out_dir, prefix).unlink(missing_ok=True)  # the directory is incomplete until the end

    start = time.perf_counter()
    summary = WriteSummary(out_dir=str(out_dir), prefix=prefix)
    encode = functools.partial(make_sample, max_side=max_side)
    with (
        AtomicShardWriter(out_dir, prefix, samples_per_shard) as writer,
        tqdm(total=total, desc=f"{prefix}-*.tar", unit="img", disable=not progress) as bar,
    ):
        for result in ordered_map(encode, items, workers):
            summary.num_inputs += 1
            if isinstance(result, Skipped):
                summary.add_skipped(result)
                bar.set_postfix(skipped=sum(summary.skipped.values()), refresh=False)
            else:
                writer.write(result)
                summary.num_samples += 1
            bar.update(1)
    summary.shards = writer.shards
    written = {shard.name for shard in writer.shards}
    for path in earlier:  # an earlier, longer run's extra shards
        if path.name not in written:
            path.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start
    manifest = {**summary.to_dict(), "samples_per_shard": samples_per_shard, "max_side": max_side}
    atomic.write_text(manifest_path(out_dir, prefix), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return summary


def corpus_items(
    source: str | os.PathLike,
    root: str | os.PathLike | None = None,
    path_column: str = "path",
    caption_column: str = "caption",
) -> tuple[Iterable[SourceItem], int]:
    """The inputs of a folder or table, and their number (for the progress bar)."""
    source = Path(source)
    if source.is_dir():
        items = folder_items(source)
        return items, len(items)
    return table_items(source, root, path_column, caption_column), count_table_rows(source)
