"""A raw webdataset sample -> a training sample {"image", "caption", "key"}, or a reason to drop it."""

from __future__ import annotations

import random
from typing import Any

import torch

from ldm.data.captions import CaptionPicker
from ldm.data.decode import IMAGE_EXTENSIONS, decode_image
from ldm.data.metadata import MetadataFilter, SampleMembers
from ldm.data.skips import NO_IMAGE, SkipSample
from ldm.data.transforms import ImageTransform


class ToTrainingSample:
    """Raw sample -> {"image": (3, size, size) tensor from the transform, "caption": str, "key": str}.

    Checks run cheapest first, and a dropped sample is counted under the first reason found: no
    image member (``no_image``), metadata filters (``filtered/<name>``, ``corrupt_metadata``), the
    caption (``empty_caption``), then the image bytes (``empty_image``, ``too_many_pixels``,
    ``too_small``, ``corrupt_image``). Raises ``SkipSample`` or ``FilteredOut``.
    """

    def __init__(
        self,
        transform: ImageTransform,
        captions: CaptionPicker | None = None,
        filters: MetadataFilter | None = None,
        max_pixels: int | None = None,
        small_images: str = "upscale",
    ):
        self.transform = transform
        self.captions = captions or CaptionPicker()
        self.filters = filters
        self.max_pixels = max_pixels
        self.small_images = small_images

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            raise SkipSample(NO_IMAGE, f"members: {sorted(k for k in sample if not k.startswith('__'))}")
        members = SampleMembers(sample)
        if self.filters:
            self.filters(members.json("json"))
        caption = self.captions(members, rng)
        image = decode_image(sample[image_ext], self.max_pixels, self.transform.size, self.small_images)
        return {"image": self.transform(image, rng), "caption": caption, "key": sample["__key__"]}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Training samples -> a batch: "image" (B, 3, H, W) stacked, "caption" and "key" as lists."""
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }
