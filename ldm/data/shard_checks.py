"""One image-caption shard checked for data_scripts/inspect_shards.py: per-sample statistics, what
the loader would skip and why (``ldm.data.skips``' names), and contact-sheet candidates.

The shard is read by ``ldm.data.shard_reader.read_shard``, the loader's reader, so samples are grouped,
capped (``max_member_bytes``) and cut short by a broken shard exactly as training sees them. The rules
are in ``ldm.data.shard_inspection``'s docstring.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.data.contact_sheet import thumbnail
from ldm.data.decode import IMAGE_EXTENSIONS
from ldm.data.shard_reader import DEFAULT_MAX_MEMBER_BYTES, local_path, read_shard, split_name
from ldm.data.skips import (
    CORRUPT_CAPTION,
    CORRUPT_IMAGE,
    CORRUPT_METADATA,
    EMPTY_CAPTION,
    EMPTY_IMAGE,
    EMPTY_MEMBER,
    NO_IMAGE,
    SHARD_REASONS,
    TOO_MANY_PIXELS,
    DataCounts,
)

MAX_EXAMPLES = 20  # bad samples and bad shards listed by name in a report
PER_SAMPLE = ("sample_bytes", "caption_chars", "caption_words", "widths", "heights")


@dataclass
class Candidate:
    """A sample that may go on the contact sheet: the smallest priorities win."""

    priority: int
    shard: str
    key: str
    caption: str
    thumbnail: Image.Image


@dataclass
class ShardResult:
    """Everything learnt from one shard; per-sample values are kept for exact statistics (as
    int64 arrays once the shard is done: 8 bytes a value, cheap to send between processes)."""

    url: str
    num_bytes: int = 0
    num_samples: int = 0
    bad_shard: dict[str, str] | None = None  # {"reason", "detail"} when the shard did not read to its end
    sample_bytes: list[int] = field(default_factory=list)
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    resolution_source: Counter = field(default_factory=Counter)  # json | header
    image_formats: Counter = field(default_factory=Counter)
    bad_samples: int = 0
    bad_by_reason: Counter = field(default_factory=Counter)
    bad_examples: list[dict[str, str]] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    def add_bad(self, key: str, reasons: dict[str, str]) -> None:
        """Count one bad sample under each of its ``reasons`` ({reason: detail})."""
        self.bad_samples += 1
        for reason, detail in reasons.items():
            self.bad_by_reason[reason] += 1
            if len(self.bad_examples) < MAX_EXAMPLES:
                self.bad_examples.append({"shard": self.url, "key": key, "reason": reason, "detail": detail})


def _priority(seed: int, url: str, key: str) -> int:
    """The sample's rank for the contact sheet; the shard's file name, not its path, so that a
    moved dataset gives the same sheet."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.blake2b(f"{seed}:{name}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _check_image(data: bytes, full: bool) -> tuple[int, int]:
    """The header's (width, height); with ``full``, decode every byte first (JPEG at 1/8 scale:
    the same check for less work). Raises what PIL raises for unreadable data."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        if full:
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    return size


def _image_problem(data: bytes, full: bool) -> tuple[tuple[int, int] | None, dict[str, str]]:
    """(the header's size or None, {reason: detail}) of an image member, named as the loader's decoder names them."""
    if not data:
        return None, {EMPTY_IMAGE: ""}
    try:
        return _check_image(data, full), {}
    except Image.DecompressionBombError as error:
        return None, {TOO_MANY_PIXELS: str(error)}
    except UnidentifiedImageError:
        return None, {CORRUPT_IMAGE: "not an image format PIL reads"}
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return None, {CORRUPT_IMAGE: f"{type(error).__name__}: {error}"}


def _resolution_from_json(meta: dict[str, Any]) -> tuple[int, int] | None:
    width, height = meta.get("width"), meta.get("height")
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    return None


def _check_sample(
    result: ShardResult,
    key: str,
    members: dict[str, bytes],
    decode: bool,
    sheet_samples: int,
    seed: int,
    thumb: int,
    caption_key: str,
) -> None:
    """Add one sample's statistics, bad reasons and sheet candidacy to ``result``."""
    reasons: dict[str, str] = {}
    result.num_samples += 1
    result.sample_bytes.append(sum(len(data) for data in members.values()))
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    empty = sorted(ext for ext, data in members.items() if not data and ext not in (image_key, caption_key, "json"))
    if empty:
        reasons[EMPTY_MEMBER] = ", ".join(empty)

    caption: str | None = None
    if caption_key not in members:
        reasons[EMPTY_CAPTION] = f"no .{caption_key}"
    else:
        try:
            caption = members[caption_key].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            reasons[CORRUPT_CAPTION] = str(error)
        else:
            result.caption_chars.append(len(caption))
            result.caption_words.append(len(caption.split()))
            if not caption:
                reasons[EMPTY_CAPTION] = f"empty .{caption_key}"

    from_json = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            from_json = _resolution_from_json(meta) if isinstance(meta, dict) else None
        except (ValueError, RecursionError) as error:  # invalid, not UTF-8, or nested too deeply
            reasons[CORRUPT_METADATA] = str(error)

    from_header = None
    if image_key is None:
        reasons[NO_IMAGE] = ", ".join(sorted(members))
    else:
        result.image_formats[image_key] += 1
        from_header, problems = _image_problem(members[image_key], decode)
        reasons.update(problems)
    for source, resolution in (("json", from_json), ("header", from_header)):
        if resolution is not None:
            result.widths.append(resolution[0])
            result.heights.append(resolution[1])
            result.resolution_source[source] += 1
            break

    if reasons:
        result.add_bad(key, reasons)
    if from_header is not None and sheet_samples > 0:
        priority = _priority(seed, result.url, key)
        heap = result.candidates  # (-priority, key, candidate): a max-heap of the best sheet_samples
        if len(heap) < sheet_samples or -heap[0][0] > priority:
            try:
                image = thumbnail(members[image_key], thumb)
            except Exception:  # noqa: BLE001 - a header-only check (decode=False) let a bad image by
                return
            entry = (-priority, key, Candidate(priority, result.url, key, caption or "", image))
            if len(heap) < sheet_samples:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)


def inspect_shard(
    url: str,
    decode: bool = True,
    sheet_samples: int = 0,
    seed: int = 0,
    thumb: int = 160,
    caption_key: str = "txt",
    read_timeout: float | None = 300.0,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
) -> ShardResult:
    """Read one shard to its end (as the loader reads it) and gather its statistics."""
    result = ShardResult(url=url)

    def reader_skipped(reason: str, where: str, detail: str) -> None:
        """What the reader drops: the shard's end (a shard reason), or a sample it never read
        (``oversized_member``, ``where`` = url:member name): a sample, and a bad one."""
        if reason in SHARD_REASONS:
            result.bad_shard = {"reason": reason, "detail": detail}
            return
        key = split_name(where[len(url) + 1 :])[0] if where.startswith(f"{url}:") else None
        result.num_samples += 1
        result.add_bad(key or where, {reason: detail})

    counts = DataCounts(on_skip=reader_skipped)  # the report lists every skip: no warnings
    for sample in read_shard(url, counts, read_timeout, max_member_bytes):
        members = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
        _check_sample(result, sample["__key__"], members, decode, sheet_samples, seed, thumb, caption_key)
    path = local_path(url)
    result.num_bytes = os.path.getsize(path) if path is not None and os.path.isfile(path) else sum(result.sample_bytes)
    for name in PER_SAMPLE:
        setattr(result, name, np.asarray(getattr(result, name), dtype=np.int64))
    result.candidates = [entry[2] for entry in sorted(result.candidates, key=lambda e: -e[0])]
    return result
