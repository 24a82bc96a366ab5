"""Inspect image-caption webdataset shards: counts, sizes, caption and resolution statistics, bad
samples, and a contact sheet of random samples.

Shards are read with `tarfile` in stream mode, grouped into samples the way webdataset groups them
(consecutive members sharing the path up to the first dot of the file name). Rules, so that counts
are exact:

* A sample is bad for each reason that applies (`bad_by_reason`); `bad_samples` counts each bad
  sample once. Reasons: 'missing image' (no jpg/jpeg/png/webp member: what the loader reads),
  'unreadable image' (PIL fails to decode it; JPEGs are decoded at 1/8 scale, which still reads
  every byte), 'missing caption', 'unreadable caption' (not UTF-8), 'unreadable json',
  'zero-byte member'. A zero-byte image is both 'zero-byte member' and 'unreadable image'.
* A shard is truncated when reading it fails (cut inside a member) or, for local files, when it
  lacks the end-of-archive blocks (cut between members). Its samples before the cut are counted;
  the sample being read when the cut came is not (webdataset drops it too).
* Caption statistics cover samples with a readable caption, stripped as the loader strips it;
  words are whitespace-separated. Resolution comes from the `.json` (`width`, `height`) when both
  are positive integers, else from the image header; aspect = width / height.
* Statistics: min, median, p95, max, mean; percentiles interpolate linearly (numpy's default).
* The contact sheet shows the samples with the smallest `blake2b(f"{seed}:{shard file name}:{key}")`
  among readable images: a uniform random choice, independent of worker count and shard order.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from ldm.data.decode import IMAGE_EXTENSIONS
from ldm.data.shard_writing import ordered_map
from ldm.data.transforms import to_rgb

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
END_OF_ARCHIVE = b"\0" * 1024  # two zero blocks close every tar archive

MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MISSING_CAPTION = "missing caption"
UNREADABLE_CAPTION = "unreadable caption"
UNREADABLE_JSON = "unreadable json"
ZERO_BYTE_MEMBER = "zero-byte member"
MAX_EXAMPLES = 20  # bad samples and truncated shards listed by name in a report


@dataclass(frozen=True)
class SheetLayout:
    """Contact sheet geometry: ``columns`` cells of a ``thumb`` px square and ``caption_lines`` lines."""

    thumb: int = 160
    columns: int = 8
    caption_lines: int = 4
    padding: int = 8

    @functools.cached_property
    def font(self) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
        return ImageFont.load_default()

    @property
    def line_height(self) -> int:
        left, top, right, bottom = self.font.getbbox("Ag|")
        return bottom + 2

    def cell(self) -> tuple[int, int]:
        """(width, height) of one cell, padding on the right/bottom included."""
        return self.thumb + self.padding, self.thumb + 2 + self.caption_lines * self.line_height + self.padding

    def size(self, count: int) -> tuple[int, int]:
        """(width, height) in px of a sheet of ``count`` samples."""
        columns = max(1, min(self.columns, count))
        rows = max(1, math.ceil(count / columns))
        cell_width, cell_height = self.cell()
        return self.padding + columns * cell_width, self.padding + rows * cell_height


@dataclass
class Candidate:
    """A sample that may go on the contact sheet: the smallest priorities win."""

    priority: int
    shard: str
    key: str
    caption: str
    thumbnail: Image.Image


PER_SAMPLE = ("sample_bytes", "caption_chars", "caption_words", "widths", "heights")


@dataclass
class ShardResult:
    """Everything learnt from one shard; per-sample values are kept for exact statistics (as
    int64 arrays once the shard is done: 8 bytes a value, cheap to send between processes)."""

    url: str
    num_bytes: int = 0
    num_samples: int = 0
    truncated: str | None = None  # why, when the shard did not read to its end
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


# ----------------------------------------------------------------------------------------- reading


def _shard_stream(url: str) -> BinaryIO:
    if url.startswith(REMOTE_PREFIXES):
        import webdataset as wds  # only for pipe:/http(s) URLs

        return wds.gopen(url, "rb")
    return open(url, "rb")


def _sample_key(name: str) -> tuple[str, str] | None:
    """'dir/000001.jpg' -> ('dir/000001', 'jpg'): webdataset's split at the file name's first dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension


class SampleReader:
    """Iterates (key, {extension: bytes}) over the complete samples of a tar stream, in order.

    Iteration raises ``tarfile.TarError`` or ``EOFError`` where the stream is cut; the sample then
    being read is not yielded. Once done, ``end_offset`` is the offset just past the last member.
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.end_offset: int | None = None

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        key: str | None = None
        members: dict[str, bytes] = {}
        with tarfile.open(fileobj=self.stream, mode="r|") as tar:
            for info in tar:
                split = _sample_key(info.name) if info.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        yield key, members
                    key, members = split[0], {}
                members[split[1]] = tar.extractfile(info).read()
                if len(members[split[1]]) != info.size:
                    raise EOFError("unexpected end of data")
            self.end_offset = tar.offset
        if key is not None:
            yield key, members


def _has_end_of_archive(path: str, offset: int) -> bool:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(len(END_OF_ARCHIVE)) == END_OF_ARCHIVE


# --------------------------------------------------------------------------------------- checking


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


def _thumbnail(data: bytes, size: int) -> Image.Image:
    """RGB image scaled (up or down, aspect kept) to fit a ``size`` px square."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size
        return ImageOps.contain(to_rgb(image), (size, size), Image.Resampling.BICUBIC)


def _resolution_from_json(meta: dict[str, Any]) -> tuple[int, int] | None:
    width, height = meta.get("width"), meta.get("height")
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    return None


def _check_sample(
    result: ShardResult, shard: str, key: str, members: dict[str, bytes], decode: bool,
    sheet_samples: int, seed: int, thumb: int, caption_key: str,
) -> None:
    """Add one sample's statistics, bad reasons and sheet candidacy to ``result``."""
    reasons: dict[str, str] = {}
    result.num_samples += 1
    result.sample_bytes.append(sum(len(data) for data in members.values()))
    zero = sorted(ext for ext, data in members.items() if not data)
    if zero:
        reasons[ZERO_BYTE_MEMBER] = ", ".join(zero)

    caption: str | None = None
    if caption_key not in members:
        reasons[MISSING_CAPTION] = ""
    else:
        try:
            caption = members[caption_key].decode("utf-8").strip()
            result.caption_chars.append(len(caption))
            result.caption_words.append(len(caption.split()))
        except UnicodeDecodeError as error:
            reasons[UNREADABLE_CAPTION] = str(error)

    from_json = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            from_json = _resolution_from_json(meta) if isinstance(meta, dict) else None
        except ValueError as error:
            reasons[UNREADABLE_JSON] = str(error)

    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    from_header = None
    if image_key is None:
        reasons[MISSING_IMAGE] = ", ".join(sorted(members))
    else:
        result.image_formats[image_key] += 1
        try:
            from_header = _check_image(members[image_key], decode)
        except UnidentifiedImageError:
            reasons[UNREADABLE_IMAGE] = "not an image format PIL reads"
        except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            reasons[UNREADABLE_IMAGE] = f"{type(error).__name__}: {error}"
    for source, resolution in (("json", from_json), ("header", from_header)):
        if resolution is not None:
            result.widths.append(resolution[0])
            result.heights.append(resolution[1])
            result.resolution_source[source] += 1
            break

    if reasons:
        result.bad_samples += 1
        for reason, detail in reasons.items():
            result.bad_by_reason[reason] += 1
            if len(result.bad_examples) < MAX_EXAMPLES:
                result.bad_examples.append({"shard": shard, "key": key, "reason": reason, "detail": detail})
    if from_header is not None and sheet_samples > 0:
        priority = _priority(seed, shard, key)
        heap = result.candidates  # (-priority, key, candidate): a max-heap of the best sheet_samples
        if len(heap) < sheet_samples or -heap[0][0] > priority:
            try:
                thumbnail = _thumbnail(members[image_key], thumb)
            except Exception:  # noqa: BLE001 - a header-only check (decode=False) let a bad image by
                return
            entry = (-priority, key, Candidate(priority, shard, key, caption or "", thumbnail))
            if len(heap) < sheet_samples:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)


def inspect_shard(
    url: str, decode: bool = True, sheet_samples: int = 0, seed: int = 0, thumb: int = 160,
    caption_key: str = "txt",
) -> ShardResult:
    """Read one shard to its end and gather its statistics (see the module docstring for the rules)."""
    result = ShardResult(url=url)
    local = not url.startswith(REMOTE_PREFIXES)
    with _shard_stream(url) as stream:
        reader = SampleReader(stream)
        samples = iter(reader)
        while True:
            try:
                key, members = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError, OSError) as error:
                result.truncated = f"{type(error).__name__}: {error}".rstrip(": ")
                break
            _check_sample(result, url, key, members, decode, sheet_samples, seed, thumb, caption_key)
    if result.truncated is None and local and not _has_end_of_archive(url, reader.end_offset):
        result.truncated = "no end-of-archive blocks (cut between members)"
    result.num_bytes = os.path.getsize(url) if local else sum(result.sample_bytes)
    for name in PER_SAMPLE:
        setattr(result, name, np.asarray(getattr(result, name), dtype=np.int64))
    result.candidates = [entry[2] for entry in sorted(result.candidates, key=lambda e: -e[0])]
    return result


# -------------------------------------------------------------------------------------- reporting


def describe(values: list[float] | np.ndarray) -> dict[str, float] | None:
    """{count, min, median, p95, max, mean} of ``values``, or None when empty."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return None
    return {
        "count": int(array.size),
        "min": float(array.min()),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
        "mean": float(array.mean()),
    }


@dataclass
class InspectionReport:
    """The whole inspection, JSON-ready via `to_dict`."""

    num_shards: int
    num_samples: int
    total_bytes: int
    shard_bytes: dict | None
    sample_bytes: dict | None
    caption_chars: dict | None
    caption_words: dict | None
    width: dict | None
    height: dict | None
    aspect: dict | None
    resolution_source: dict[str, int]
    image_formats: dict[str, int]
    bad_samples: int
    bad_by_reason: dict[str, int]  # reason -> samples; 'truncated shard' -> shards
    bad_examples: list[dict[str, str]]
    truncated_shards: list[dict[str, str]]
    sheet: list[Candidate] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sheet"}  # no image copies
        data["sheet"] = [{"shard": c.shard, "key": c.key, "caption": c.caption} for c in self.sheet]
        return data


def merge(results: list[ShardResult], sheet_samples: int = 0) -> InspectionReport:
    """Per-shard results -> one report; the sheet keeps the ``sheet_samples`` smallest priorities."""
    def concat(name: str) -> list:
        return [value for result in results for value in getattr(result, name)]

    def values(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(result, name), dtype=np.int64) for result in results] or [[]])

    def total(name: str) -> dict[str, int]:
        counter: Counter = sum((getattr(result, name) for result in results), Counter())
        return dict(sorted(counter.items()))

    widths, heights = values("widths"), values("heights")
    truncated = [{"shard": r.url, "detail": r.truncated} for r in results if r.truncated is not None]
    bad_by_reason = total("bad_by_reason")
    if truncated:
        bad_by_reason["truncated shard"] = len(truncated)
    sheet = sorted(concat("candidates"), key=lambda c: c.priority)[:sheet_samples]
    return InspectionReport(
        num_shards=len(results),
        num_samples=sum(r.num_samples for r in results),
        total_bytes=sum(r.num_bytes for r in results),
        shard_bytes=describe([r.num_bytes for r in results]),
        sample_bytes=describe(values("sample_bytes")),
        caption_chars=describe(values("caption_chars")),
        caption_words=describe(values("caption_words")),
        width=describe(widths),
        height=describe(heights),
        aspect=describe(widths / np.maximum(heights, 1)),
        resolution_source=total("resolution_source"),
        image_formats=total("image_formats"),
        bad_samples=sum(r.bad_samples for r in results),
        bad_by_reason=bad_by_reason,
        bad_examples=concat("bad_examples")[:MAX_EXAMPLES],
        truncated_shards=truncated[:MAX_EXAMPLES],
        sheet=sheet,
    )


def inspect_shards(
    urls: list[str],
    decode: bool = True,
    sheet_samples: int = 0,
    seed: int = 0,
    layout: SheetLayout = SheetLayout(),
    workers: int = 1,
    caption_key: str = "txt",
    progress: bool = True,
) -> InspectionReport:
    """Inspect every shard of ``urls`` (``workers`` processes, one shard each at a time)."""
    from tqdm import tqdm

    inspect = functools.partial(
        inspect_shard, decode=decode, sheet_samples=sheet_samples, seed=seed, thumb=layout.thumb,
        caption_key=caption_key,
    )
    results = list(tqdm(ordered_map(inspect, urls, workers, chunk_size=1), total=len(urls), desc="shards",
                        unit="shard", disable=not progress))
    return merge(results, sheet_samples)


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_report(report: InspectionReport) -> str:
    """The report as a readable text block."""
    lines = [
        f"shards   {report.num_shards}   samples {report.num_samples}   total {_bytes(report.total_bytes)}",
        "",
        f"{'':<16}{'min':>10}{'median':>10}{'p95':>10}{'max':>10}{'mean':>10}",
    ]
    rows = [
        ("bytes/shard", report.shard_bytes, _bytes), ("bytes/sample", report.sample_bytes, _bytes),
        ("caption chars", report.caption_chars, _number), ("caption words", report.caption_words, _number),
        ("width", report.width, _number), ("height", report.height, _number), ("aspect w/h", report.aspect, _number),
    ]
    for name, stats, fmt in rows:
        if stats is None:
            lines.append(f"{name:<16}{'-':>10}")
        else:
            lines.append(f"{name:<16}" + "".join(f"{fmt(stats[k]):>10}" for k in ("min", "median", "p95", "max", "mean")))
    formats = ", ".join(f"{ext} {count}" for ext, count in report.image_formats.items()) or "-"
    sources = ", ".join(f".{src} {count}" if src == "json" else f"image {src} {count}"
                        for src, count in report.resolution_source.items()) or "-"
    lines += ["", f"image members   {formats}", f"resolution from {sources}", ""]
    if report.bad_samples or report.truncated_shards:
        reasons = ", ".join(f"{count} {reason}" for reason, count in report.bad_by_reason.items())
        lines.append(f"bad samples     {report.bad_samples} of {report.num_samples} ({reasons})")
        lines += [f"  {e['shard']} {e['key']}: {e['reason']} {e['detail']}".rstrip() for e in report.bad_examples[:10]]
        lines += [f"  truncated {t['shard']}: {t['detail']}" for t in report.truncated_shards]
    else:
        lines.append(f"bad samples     0 of {report.num_samples}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- contact sheet


def wrap_text(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` px; words wider than a line are split; '...' marks a cut."""
    measure = functools.partial(ImageDraw.Draw(Image.new("L", (1, 1))).textlength, font=font)
    lines: list[str] = []
    line = ""
    for word in text.split():
        while measure(word) > width:  # split an over-long word at its longest fitting prefix
            cut = 1
            while cut < len(word) and measure(word[: cut + 1]) <= width:
                cut += 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if measure(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def contact_sheet(samples: list[tuple[Image.Image, str]], layout: SheetLayout = SheetLayout()) -> Image.Image:
    """A grid of thumbnails, each centred in a ``layout.thumb`` square, its caption wrapped below."""
    sheet = Image.new("RGB", layout.size(len(samples)), "white")
    draw = ImageDraw.Draw(sheet)
    columns = max(1, min(layout.columns, len(samples)))
    cell_width, cell_height = layout.cell()
    for index, (image, caption) in enumerate(samples):
        x = layout.padding + (index % columns) * cell_width
        y = layout.padding + (index // columns) * cell_height
        draw.rectangle([x, y, x + layout.thumb - 1, y + layout.thumb - 1], fill=(230, 230, 230))
        sheet.paste(image, (x + (layout.thumb - image.width) // 2, y + (layout.thumb - image.height) // 2))
        lines = wrap_text(caption or "(no caption)", layout.font, layout.thumb, layout.caption_lines)
        for number, line in enumerate(lines):
            draw.text((x, y + layout.thumb + 2 + number * layout.line_height), line, fill="black", font=layout.font)
    return sheet


def save_contact_sheet(report: InspectionReport, path: str | os.PathLike, layout: SheetLayout = SheetLayout()) -> Path:
    """Write the report's sheet samples as a PNG contact sheet at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet([(c.thumbnail, c.caption) for c in report.sheet], layout).save(path, format="PNG")
    return path
