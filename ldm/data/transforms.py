"""Image transforms from decoded PIL images to training tensors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2 as T


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white rather than dropped to black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits instead of clipping
        array = np.asarray(image, dtype=np.float32)
        scaled = np.clip(array / max(float(array.max()), 1.0) * 255, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """RGB PIL image -> (3, size, size) float tensor in [-1, 1]: resize short side, crop, optional flip.

    random_flip must stay off when captions name left and right (as the toy's do).
    """

    def __init__(self, size: int, center_crop: bool = True, random_flip: bool = False):
        steps = [
            T.ToImage(),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(size) if center_crop else T.RandomCrop(size),
        ]
        if random_flip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.ToDtype(torch.float32, scale=True))
        self.transform = T.Compose(steps)
        self.size = size

    def __call__(self, image: Image.Image) -> Tensor:
        x = self.transform(to_rgb(image))  # (3, size, size) in [0, 1]
        return (x * 2 - 1).clamp(-1, 1)
