"""A raw webdataset sample -> a training sample {"image", "caption", "key"}, or a reason to drop it.

Each stream binds its ``ToTrainingSample`` (its own copy, in each loader worker) to its place and
its counts (``bind``): captions cut to their cap are counted there, and with a quarantine, every
sample's key is recorded as in flight while it is decoded (``ldm.data.quarantine``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from ldm.data.captions import CaptionPicker
from ldm.data.decode import IMAGE_EXTENSIONS, decode_image
from ldm.data.metadata import MetadataFilter, SampleMembers
from ldm.data.quarantine import Quarantine
from ldm.data.skips import CAPTION, CORRUPT_METADATA, NO_IMAGE, QUARANTINED, DataCounts, FilteredOut, SkipSample
from ldm.data.transforms import ImageTransform


class ToTrainingSample:
    """Raw sample -> {"image": (3, size, size) tensor from the transform, "caption": str, "key": str}.

    Checks run cheapest first, and a dropped sample is counted under the first reason found: no
    key in the quarantine (``quarantined``), image member (``no_image``), metadata filters
    (``filtered/<name>``, ``corrupt_metadata``: any error while reading the metadata and caption is
    the data's), the caption (``empty_caption``), then the image bytes (``empty_image``,
    ``too_many_pixels``, ``too_small``, ``corrupt_image``). Raises ``SkipSample`` or ``FilteredOut``.
    quarantine: the quarantine of ``data.quarantine`` (None: off).
    """

    def __init__(
        self,
        transform: ImageTransform,
        captions: CaptionPicker | None = None,
        filters: MetadataFilter | None = None,
        max_pixels: int | None = None,
        small_images: str = "upscale",
        quarantine: Quarantine | None = None,
    ):
        self.transform = transform
        self.captions = captions or CaptionPicker()
        self.filters = filters
        self.max_pixels = max_pixels
        self.small_images = small_images
        self.quarantine = quarantine
        self.counts = DataCounts()  # replaced by the stream's own in ``bind``

    def bind(self, split: str, rank: int, worker: int, counts: DataCounts) -> None:
        """Called by the stream at the start of each iteration, in the process that decodes."""
        self.counts = counts
        if self.quarantine is not None:
            self.quarantine.start(split, rank, worker)

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        return quarantined_call(self.quarantine, self._convert, sample, rng)

    def _convert(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            raise SkipSample(NO_IMAGE, f"members: {sorted(k for k in sample if not k.startswith('__'))}")
        members = SampleMembers(sample)
        try:
            if self.filters:
                self.filters(members.json("json"))
            caption, cut = self.captions.pick(members, rng)
        except (SkipSample, FilteredOut):
            raise
        except Exception as error:  # noqa: BLE001 - hostile metadata (odd types, sizes) is the data's fault
            raise SkipSample(CORRUPT_METADATA, f"{type(error).__name__}: {error}"[:300]) from None
        if cut:
            self.counts.truncated(CAPTION)
        image = decode_image(sample[image_ext], self.max_pixels, self.transform.size, self.small_images)
        return {"image": self.transform(image, rng), "caption": caption, "key": sample["__key__"]}


def quarantined_call(
    quarantine: Quarantine | None,
    convert: Callable[[dict[str, Any], random.Random], dict[str, Any]],
    sample: dict[str, Any],
    rng: random.Random,
) -> dict[str, Any]:
    """``convert(sample, rng)``, skipping a quarantined key and recording the key while it runs."""
    if quarantine is None:
        return convert(sample, rng)
    url, key = str(sample.get("__url__", "")), str(sample["__key__"])
    if quarantine.holds(url, key):
        raise SkipSample(QUARANTINED)
    quarantine.begin(url, key)
    try:
        return convert(sample, rng)
    finally:
        quarantine.end()


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> a batch: tensor fields stacked ("image" (B, 3, H, W); "latent" (B, C, h, w),
    "context" (B, L, D)), the others ("caption", "key") as lists."""
    return {
        name: torch.stack([s[name] for s in samples]) if isinstance(value, torch.Tensor) else [s[name] for s in samples]
        for name, value in samples[0].items()
    }
