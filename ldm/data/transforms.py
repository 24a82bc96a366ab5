"""Image transforms from decoded PIL images to training tensors."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor

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
    """RGB PIL image -> (3, size, size) float tensor in [-1, 1]: short side resized to ``size``, a
    centre (or random) square crop, optional horizontal flip.

    The crop is taken in the source image and resized in one step (``Image.resize(box=...)``), which
    is the same geometry as resize-then-crop but resamples only the kept pixels; an image that
    already has the target size is not resampled at all. Smaller images are upscaled (the caller
    decides whether to skip them first, see ``small_images``). ``random_flip`` must stay off when
    captions name left and right (as the toy's do).
    """

    def __init__(self, size: int, center_crop: bool = True, random_flip: bool = False):
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        rng = rng or random.Random()
        image = to_rgb(image)
        width, height = image.size
        side = min(width, height)
        if self.center_crop:
            left, top = (width - side) // 2, (height - side) // 2
        else:
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (left, top, left + side, top + side)
        if (width, height) == (self.size, self.size):
            pass  # fast path: already the target size
        elif side == self.size:
            image = image.crop(box)
        else:
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, size, size) uint8 (a writable copy)
        return pixels.float().div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)
