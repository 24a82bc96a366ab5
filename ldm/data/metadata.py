"""Sample members as text and JSON, and thresholds on the ``.json`` metadata that img2dataset writes.

img2dataset's ``.json`` holds (among others) ``width``/``height`` (as stored), ``original_width``/
``original_height`` (as downloaded), and, for LAION subsets, ``aesthetic`` (or ``AESTHETIC_SCORE``),
``pwatermark``, ``punsafe`` and ``similarity`` (CLIP image-text cosine).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ldm.data.skips import CORRUPT_METADATA, FilteredOut, SkipSample

# metadata keys tried in order for each quantity
AESTHETIC_KEYS = ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")
WATERMARK_KEYS = ("pwatermark",)
UNSAFE_KEYS = ("punsafe",)
SIMILARITY_KEYS = ("similarity",)
SIZE_KEYS = (("original_width", "original_height"), ("width", "height"))


class SampleMembers:
    """Read access to one raw sample's members: ``text(ext)`` decodes UTF-8, ``json(ext)`` parses
    (once) and raises ``SkipSample("corrupt_metadata")`` when the member is not valid JSON or is
    nested too deeply to parse (``[[[[...`` a hundred thousand deep raises ``RecursionError``)."""

    def __init__(self, sample: Mapping[str, Any]):
        self.sample = sample
        self._parsed: dict[str, Any] = {}

    def text(self, ext: str) -> str | None:
        value = self.sample.get(ext)
        if value is None:
            return None
        return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)

    def json(self, ext: str = "json") -> Any:
        if ext not in self._parsed:
            text = self.text(ext)
            try:
                self._parsed[ext] = json.loads(text) if text is not None and text.strip() else None
            except ValueError as error:
                raise SkipSample(CORRUPT_METADATA, f".{ext}: {error}") from None
            except RecursionError:
                raise SkipSample(CORRUPT_METADATA, f".{ext}: nested too deeply to parse") from None
        return self._parsed[ext]


def _number(metadata: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    """The first of ``keys`` holding a finite number (numbers in strings count), else None."""
    for key in keys:
        try:
            value = float(metadata[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return None


def _size(metadata: Mapping[str, Any]) -> tuple[float, float] | None:
    for width_key, height_key in SIZE_KEYS:
        width, height = _number(metadata, (width_key,)), _number(metadata, (height_key,))
        if width and height and width > 0 and height > 0:
            return width, height
    return None


class MetadataFilter:
    """Thresholds on a sample's ``.json`` metadata; each None threshold is off.

    A sample is rejected by the first failing filter, in the order of the arguments; one whose
    metadata lacks the quantity a filter needs passes that filter (so a filter never empties a
    dataset that simply does not have the field).

    min_size: minimum short side (px) of the original image (``original_width``/``original_height``,
        else ``width``/``height``).
    max_aspect_ratio: maximum long side / short side of the original image.
    min_aesthetic: minimum aesthetic score (``aesthetic``, ``AESTHETIC_SCORE``, ``aesthetic_score``).
    max_watermark: maximum watermark probability (``pwatermark``).
    max_unsafe: maximum NSFW probability (``punsafe``).
    min_similarity: minimum CLIP image-text similarity (``similarity``).
    """

    def __init__(
        self,
        min_size: float | None = None,
        max_aspect_ratio: float | None = None,
        min_aesthetic: float | None = None,
        max_watermark: float | None = None,
        max_unsafe: float | None = None,
        min_similarity: float | None = None,
    ):
        self.thresholds = {
            "min_size": min_size,
            "max_aspect_ratio": max_aspect_ratio,
            "min_aesthetic": min_aesthetic,
            "max_watermark": max_watermark,
            "max_unsafe": max_unsafe,
            "min_similarity": min_similarity,
        }
        self.active = {name: float(value) for name, value in self.thresholds.items() if value is not None}

    def __bool__(self) -> bool:
        return bool(self.active)

    def __call__(self, metadata: Mapping[str, Any] | None) -> None:
        """Raise ``FilteredOut(name)`` if a filter rejects ``metadata`` (None: no metadata, passes)."""
        if not self.active or not isinstance(metadata, Mapping):
            return
        for name, threshold in self.active.items():
            if self._rejects(name, threshold, metadata):
                raise FilteredOut(name)

    @staticmethod
    def _rejects(name: str, threshold: float, metadata: Mapping[str, Any]) -> bool:
        if name in ("min_size", "max_aspect_ratio"):
            size = _size(metadata)
            if size is None:
                return False
            if name == "min_size":
                return min(size) < threshold
            return max(size) / min(size) > threshold
        keys = {
            "min_aesthetic": AESTHETIC_KEYS,
            "max_watermark": WATERMARK_KEYS,
            "max_unsafe": UNSAFE_KEYS,
            "min_similarity": SIMILARITY_KEYS,
        }[name]
        value = _number(metadata, keys)
        if value is None:
            return False
        return value < threshold if name.startswith("min_") else value > threshold
