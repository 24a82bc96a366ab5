"""Aspect-ratio buckets: training shapes of about the same pixel count, each image cropped to the one
nearest its own aspect ratio, so portraits and panoramas are not squeezed into a centre square.

A bucket is a (width, height) pair. ``auto_buckets(512)`` gives the usual set around 512 x 512: sides
multiples of 64, about 512^2 pixels each, aspect ratios up to 2:1 both ways. An image goes to the
bucket whose aspect ratio is nearest its own (compared as log ratios, so 2:1 and 1:2 are equally far
from 1:1); with ``no_upscale`` only buckets the image covers (width and height both at least the
bucket's) are candidates, and an image covering none is skipped as ``too_small``. Every batch holds
one bucket: the streams group samples by shape (``ldm.data.streams``, ``ldm.data.folder``).
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ldm.data.captions import CaptionPicker
from ldm.data.decode import IMAGE_EXTENSIONS
from ldm.data.metadata import MetadataFilter
from ldm.data.quarantine import Quarantine
from ldm.data.samples import ToTrainingSample, quarantined_call
from ldm.data.skips import TOO_SMALL, DataCounts, SkipSample
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError

Bucket = tuple[int, int]  # (width, height)
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
BUCKET_KEY = "__bucket__"  # a raw sample's pre-assigned bucket index (the folder stream sets it)


def auto_buckets(base: int, step: int = 64, max_ratio: float = 2.0) -> list[Bucket]:
    """Buckets of about ``base`` x ``base`` pixels: for each width a multiple of ``step``, the height
    (a multiple of ``step``) nearest base^2 / width; aspect ratios up to ``max_ratio`` each way.
    ``auto_buckets(512)``: 512x512, 576x448, 640x384, 704x384 and the same turned upright."""
    if base < step or base % step:
        raise UserError(f"data.image_size ({base}) must be a positive multiple of data.bucket_step ({step})")
    area = base * base
    landscape = []
    for width in range(base, int(base * math.sqrt(max_ratio)) + step + 1, step):
        height = max(step, round(area / width / step) * step)
        if width / height <= max_ratio and height <= width:
            landscape.append((width, height))
    buckets = set(landscape) | {(h, w) for w, h in landscape}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b))


def resolve_buckets(spec: Any, image_size: int, step: int = 64, max_ratio: float = 2.0) -> list[Bucket] | None:
    """``data.buckets``: null/false (off: square ``image_size`` crops), ``auto`` (``auto_buckets`` of
    ``image_size``), or a list of [width, height] pairs. Raises ``UserError`` on anything else."""
    if spec is None or spec is False:
        return None
    if spec == "auto":
        return auto_buckets(image_size, step, max_ratio)
    try:
        buckets = sorted({(int(w), int(h)) for w, h in spec}, key=lambda b: (b[0] / b[1], b))
    except (TypeError, ValueError):
        raise UserError(f"data.buckets must be null, auto or a list of [width, height], not {spec!r}") from None
    if not buckets or any(w <= 0 or h <= 0 for w, h in buckets):
        raise UserError(f"data.buckets needs positive [width, height] pairs, not {spec!r}")
    odd = [b for b in buckets if b[0] % 8 or b[1] % 8]
    if odd:
        raise UserError(f"data.buckets {odd[0]}: sides must be multiples of 8 (the VAE's downsampling)")
    return buckets


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket], no_upscale: bool = False) -> int | None:
    """Index of the bucket nearest the image's aspect ratio (ties: the first, i.e. the squarer or
    narrower); with ``no_upscale`` only among the buckets the image covers (None if none)."""
    ratio = math.log(width / height)
    best, best_distance = None, math.inf
    for index, (w, h) in enumerate(buckets):
        if no_upscale and (width < w or height < h):
            continue
        distance = abs(math.log(w / h) - ratio)
        if distance < best_distance - 1e-12:
            best, best_distance = index, distance
    return best


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened (not decoded) image once its EXIF orientation is applied, as
    ``ldm.data.decode`` decodes it: phone portraits are stored sideways."""
    width, height = image.size
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: decode keeps the image as stored
        return width, height
    return (height, width) if orientation in TRANSPOSED else (width, height)


def header_size(data: bytes) -> tuple[int, int] | None:
    """Upright (width, height) from the image header (no pixel is decoded); None if unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as image:
                return upright_size(image)
        except Exception:  # noqa: BLE001 - the decoder will name the problem (corrupt_image, ...)
            return None


class BucketedSample:
    """Raw sample -> training sample cropped to its aspect bucket (``ToTrainingSample`` per bucket).

    The bucket is the raw sample's ``__bucket__`` index when present (the folder stream assigns buckets
    once, from the headers), else chosen here from the image header. ``no_upscale``: an image smaller
    than its nearest bucket goes to the nearest one it covers, or is skipped as ``too_small``.
    The other arguments are ``ImageTransform``'s and ``ToTrainingSample``'s.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        captions: CaptionPicker | None = None,
        filters: MetadataFilter | None = None,
        max_pixels: int | None = None,
        no_upscale: bool = False,
        center_crop: bool = True,
        random_flip: bool = False,
        uint8: bool = False,
        quarantine: Quarantine | None = None,
    ):
        if not buckets:
            raise ValueError("at least one bucket is needed")
        self.buckets = list(buckets)
        self.no_upscale = no_upscale
        self.quarantine = quarantine  # here, around the bucket choice too, not in each bucket's converter
        # small_images="upscale": whether an image may be enlarged is decided here, per bucket
        self.per_bucket = [
            ToTrainingSample(ImageTransform(bucket, center_crop, random_flip, uint8), captions, filters, max_pixels)
            for bucket in self.buckets
        ]

    def bind(self, split: str, rank: int, worker: int, counts: DataCounts) -> None:
        """The stream's counts for every bucket's converter, and this worker's quarantine record."""
        for converter in self.per_bucket:
            converter.bind(split, rank, worker, counts)
        if self.quarantine is not None:
            self.quarantine.start(split, rank, worker)

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        return quarantined_call(self.quarantine, self._convert, sample, rng)

    def _convert(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        index = sample.get(BUCKET_KEY)
        if index is None:
            index = self.choose(sample)
        return self.per_bucket[index](sample, rng)

    def choose(self, sample: dict[str, Any]) -> int:
        """The bucket of a raw sample, from its image header (an unreadable header: bucket 0, and the
        decoder then counts the sample as corrupt)."""
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        size = header_size(sample[image_ext]) if image_ext else None
        if size is None:
            return 0
        index = nearest_bucket(*size, self.buckets, self.no_upscale)
        if index is None:
            raise SkipSample(TOO_SMALL, f"{size[0]}x{size[1]} is smaller than every bucket")
        return index
