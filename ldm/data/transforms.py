"""Image transforms from decoded PIL images to training tensors."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

BICUBIC = F.InterpolationMode.BICUBIC
WHITE = (255, 255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Transparency (RGBA, LA, La, PA, RGBa, P with a transparent colour) is composited on white
    rather than dropped to black; 16-bit grayscale (I;16*, and I holding values over 255) is scaled
    by 255/65535 so that brightness is kept; float (F) images in [0, 1] are scaled to [0, 255];
    CMYK, YCbCr, LAB, HSV, 1, L and P go through PIL's own conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        # (La, premultiplied, converts to RGBA only through LA)
        rgba = image.convert("LA").convert("RGBA") if image.mode == "La" else image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
            array = array * (255 / 65535)
        elif image.mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """RGB PIL image -> (3, height, width) float tensor in [-1, 1] (or the uint8 pixels, ``uint8=True``):
    resized, keeping its aspect ratio, until it covers the target, then a centre (or random) crop to
    the target and an optional horizontal flip.

    size: ``S`` for an S x S square (the default training shape), or ``(width, height)`` for an
        aspect-ratio bucket (``ldm.data.buckets``). ``self.size`` stays the side the decoder must keep
        (the long side of the target), so that JPEGs decoded at reduced scale still cover it.

    The largest window of the target's aspect ratio is cropped first and then resized (the same
    geometry as resize-then-crop, with fewer pixels to resample), bicubic with antialiasing on uint8
    (torchvision's vectorised kernel, about twice as fast as PIL's); an image that already has the
    target size is not resampled at all. Smaller images are upscaled (the caller decides whether to
    skip them first, see ``small_images``). ``random_flip`` must stay off when captions name left and
    right (as the toy's do). ``rng`` draws the crop offset and the flip (default: a fresh unseeded
    generator).
    """

    def __init__(
        self, size: int | tuple[int, int], center_crop: bool = True, random_flip: bool = False, uint8: bool = False
    ):
        self.width, self.height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.size = max(self.width, self.height)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.uint8 = uint8  # (3, height, width) uint8 out; `to_model_range` maps it to [-1, 1] later

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        rng = rng or random.Random()
        pixels = np.array(to_rgb(image))  # (H, W, 3) uint8, a writable copy
        height, width = pixels.shape[:2]
        crop_w, crop_h = crop_window(width, height, self.width, self.height)
        if self.center_crop:
            left, top = (width - crop_w) // 2, (height - crop_h) // 2
        else:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        window = pixels[top : top + crop_h, left : left + crop_w].transpose(2, 0, 1)  # (3, crop_h, crop_w) view
        if (crop_w, crop_h) != (self.width, self.height):
            target = [self.height, self.width]
            window = F.resize(torch.from_numpy(window), target, interpolation=BICUBIC, antialias=True).numpy()
        if self.random_flip and rng.random() < 0.5:
            window = window[:, :, ::-1]
        if self.uint8:
            return torch.from_numpy(np.ascontiguousarray(window))  # (3, height, width)
        # to [-1, 1] in NumPy, not torch: torch's intra-op threads make small element-wise ops up to
        # 100x slower in a busy process; x / 127.5 - 1 maps 0 and 255 exactly to -1 and 1
        out = np.ascontiguousarray(window, dtype=np.float32)
        out /= 127.5
        out -= 1.0
        return torch.from_numpy(out)


def crop_window(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """(w, h) of the largest window of a width x height image with the target's aspect ratio: the
    whole short side for a square target, as in the classic centre crop."""
    if width * target_h > height * target_w:  # wider than the target: keep the full height
        return min(width, max(1, round(height * target_w / target_h))), height
    return width, min(height, max(1, round(width * target_h / target_w)))


def to_model_range(images: Tensor) -> Tensor:
    """uint8 pixels (B, 3, H, W) -> float32 in [-1, 1], exactly as ``ImageTransform`` maps them
    (x / 127.5 - 1); float input is returned as it is."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1.0)
