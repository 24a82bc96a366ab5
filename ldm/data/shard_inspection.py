"""Inspect image-caption webdataset shards: counts, sizes, caption and resolution statistics, what the
loader would skip and why, and a contact sheet of random samples (data_scripts/inspect_shards.py).

The parts: ``ldm.data.shard_checks`` reads and checks one shard, this module runs it over the shards
(``ldm.data.ordered_map``) and aggregates the results into one report, ``ldm.data.inspection_text``
prints it, ``ldm.data.contact_sheet`` draws the sheet. Rules, so that counts are exact:

* Shards are read by the loader's reader (``ldm.data.shard_reader.read_shard``): samples are grouped
  as webdataset groups them, a member over ``max_member_bytes`` drops its sample unread, and a shard
  that breaks is cut where the loader cuts it.
* A sample is bad for each reason that applies (`bad_by_reason`); `bad_samples` counts each bad
  sample once. Reasons are the loader's (``ldm.data.skips``): ``no_image`` (no jpg/jpeg/png/webp
  member), ``empty_image`` (a zero-byte one), ``corrupt_image`` (PIL fails to decode it; JPEGs are
  decoded at 1/8 scale, which still reads every byte), ``too_many_pixels`` (over PIL's bomb limit),
  ``empty_caption`` (no caption member, or a blank one: dropped with ``data.empty_captions=drop``),
  ``corrupt_metadata`` (a `.json` that does not parse), ``oversized_member``; and two the loader
  does not skip for: ``corrupt_caption`` (not UTF-8: the loader reads it with replacement
  characters) and ``empty_member`` (any other zero-byte member).
* A shard that cannot be opened is ``unreadable_shard``; one that breaks inside a member, or lacks
  the end-of-archive blocks, ``truncated_shard`` (``stalled_shard``: no data for ``read_timeout``
  seconds). Its samples before the cut are counted; the sample being read when the cut came is not
  (the loader drops it too: it may lack members). Shard reasons count shards (`bad_shards`).
* Caption statistics cover samples with a UTF-8 caption, stripped as the loader strips it;
  words are whitespace-separated. Resolution comes from the `.json` (`width`, `height`) when both
  are positive integers, else from the image header; aspect = width / height.
* Statistics: min, median, p95, max, mean; percentiles interpolate linearly (numpy's default).
* The contact sheet shows the samples with the smallest `blake2b(f"{seed}:{shard file name}:{key}")`
  among readable images: a uniform random choice, independent of worker count and shard order.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ldm import atomic
from ldm.data.contact_sheet import SheetLayout, contact_sheet
from ldm.data.ordered_map import ordered_map
from ldm.data.shard_checks import MAX_EXAMPLES, Candidate, ShardResult, inspect_shard


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
    bad_by_reason: dict[str, int]  # sample reason -> samples, then shard reason -> shards
    bad_examples: list[dict[str, str]]
    bad_shards: list[dict[str, str]]  # {"shard", "reason", "detail"}
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
    bad_shards = [{"shard": r.url, **r.bad_shard} for r in results if r.bad_shard is not None]
    bad_by_reason = {**total("bad_by_reason"), **dict(sorted(Counter(s["reason"] for s in bad_shards).items()))}
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
        bad_shards=bad_shards[:MAX_EXAMPLES],
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
        inspect_shard,
        decode=decode,
        sheet_samples=sheet_samples,
        seed=seed,
        thumb=layout.thumb,
        caption_key=caption_key,
    )
    results = list(
        tqdm(
            ordered_map(inspect, urls, workers, chunk_size=1),
            total=len(urls),
            desc="shards",
            unit="shard",
            disable=not progress,
        )
    )
    return merge(results, sheet_samples)


def save_contact_sheet(report: InspectionReport, path: str | os.PathLike, layout: SheetLayout = SheetLayout()) -> Path:
    """Write the report's sheet samples as a PNG contact sheet at ``path`` (atomically)."""
    path = Path(path)
    sheet = contact_sheet([(c.thumbnail, c.caption) for c in report.sheet], layout)
    with atomic.atomic_open(path, "wb") as file:
        sheet.save(file, format="PNG")
    return path
