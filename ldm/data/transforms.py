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
    """RGB PIL image -> (3, size, size) float tensor in [-1, 1] (or the uint8 pixels, ``uint8=True``):
    short side resized to ``size``, a centre (or random) square crop, optional horizontal flip.

    The square is cropped first and then resized (the same geometry as resize-then-crop, with fewer
    pixels to resample), bicubic with antialiasing on uint8 (torchvision's vectorised kernel, about
    twice as fast as PIL's); an image that already has the target size is not resampled at all.
    Smaller images are upscaled (the caller decides whether to skip them first, see
    ``small_images``). ``random_flip`` must stay off when captions name left and right (as the
    toy's do). ``rng`` draws the crop offset and the flip (default: a fresh unseeded generator).
    """

    def __init__(self, size: int, center_crop: bool = True, random_flip: bool = False, uint8: bool = False):
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.uint8 = uint8  # (3, size, size) uint8 out; `to_model_range` maps it to [-1, 1] later

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        rng = rng or random.Random()
        pixels = np.array(to_rgb(image))  # (H, W, 3) uint8, a writable copy
        height, width = pixels.shape[:2]
        side = min(width, height)
        if self.center_crop:
            left, top = (width - side) // 2, (height - side) // 2
        else:
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        square = pixels[top : top + side, left : left + side].transpose(2, 0, 1)  # (3, side, side) view
        if side != self.size:
            resized = F.resize(torch.from_numpy(square), [self.size, self.size], interpolation=BICUBIC, antialias=True)
            square = resized.numpy()  # (3, size, size) uint8
        if self.random_flip and rng.random() < 0.5:
            square = square[:, :, ::-1]
        if self.uint8:
            return torch.from_numpy(np.ascontiguousarray(square))
        # to [-1, 1] in NumPy, not torch: torch's intra-op threads make small element-wise ops up to
        # 100x slower in a busy process; x / 127.5 - 1 maps 0 and 255 exactly to -1 and 1
        out = np.ascontiguousarray(square, dtype=np.float32)
        out /= 127.5
        out -= 1.0
        return torch.from_numpy(out)


def to_model_range(images: Tensor) -> Tensor:
    """uint8 pixels (B, 3, H, W) -> float32 in [-1, 1], exactly as ``ImageTransform`` maps them
    (x / 127.5 - 1); float input is returned as it is."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1.0)
