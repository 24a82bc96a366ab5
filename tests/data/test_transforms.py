import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.transforms import ImageTransform, to_rgb


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "I;16", "RGBA", "LA", "1"])
def test_every_mode_converts_to_rgb(mode):
    image = Image.new(mode, (8, 8))
    assert to_rgb(image).mode == "RGB"


def test_transparency_composites_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_gray_is_scaled_not_clipped():
    array = np.full((4, 4), 30000, dtype=np.uint16)
    array[0, 0] = 60000
    rgb = np.asarray(to_rgb(Image.fromarray(array)))
    assert rgb[0, 0, 0] == 255 and 100 < rgb[1, 1, 0] < 150


def test_transform_resizes_crops_and_normalises():
    image = Image.fromarray(np.full((40, 80, 3), 255, dtype=np.uint8))
    x = ImageTransform(16)(image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    black = ImageTransform(16)(Image.new("RGB", (16, 16)))
    assert torch.allclose(black, -torch.ones_like(black))


def test_flip_is_off_by_default():
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255
    for _ in range(10):
        x = ImageTransform(8)(Image.fromarray(array))
        assert x[0, 0, 0] > 0 and x[0, 0, -1] < 0
