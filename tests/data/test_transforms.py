import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.transforms import ImageTransform, to_model_range, to_rgb


@pytest.mark.parametrize(
    "mode",
    [
        "RGB",
        "L",
        "P",
        "PA",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I;16",
        "I;16B",
        "I",
        "F",
        "RGBA",
        "RGBa",
        "LA",
        "La",
        "RGBX",
        "1",
    ],
)
def test_every_mode_converts_to_rgb(mode):
    image = Image.new(mode, (8, 8))
    assert to_rgb(image).mode == "RGB"


def test_transparency_composites_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(image))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_gray_is_scaled_not_clipped():
    # full scale 65535 -> 255 (not the image's own maximum: a dark 16-bit image stays dark)
    array = np.full((4, 4), 30000, dtype=np.uint16)
    array[0, 0] = 60000
    rgb = np.asarray(to_rgb(Image.fromarray(array)))
    assert rgb[0, 0, 0] == round(60000 * 255 / 65535) and rgb[1, 1, 0] == round(30000 * 255 / 65535)
    as_int32 = Image.fromarray(array.astype(np.int32))  # mode I, as some decoders give 16-bit PNGs
    assert np.array_equal(np.asarray(to_rgb(as_int32)), rgb)
    floats = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, 0, 0] == 128


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


def test_image_of_the_target_size_is_not_resampled():
    array = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = ImageTransform(16)(Image.fromarray(array))
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(array).permute(2, 0, 1))
    tall = np.random.default_rng(1).integers(0, 256, (24, 16, 3), dtype=np.uint8)  # short side fits: crop only
    x = ImageTransform(16)(Image.fromarray(tall))
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(tall[4:20]).permute(2, 0, 1))


def test_crop_then_resize_matches_resize_then_crop():
    rng = np.random.default_rng(2)
    smooth = np.kron(rng.integers(0, 256, (8, 16, 3)), np.ones((12, 12, 1))).astype(np.uint8)  # (96, 192)
    image = Image.fromarray(smooth)
    x = ImageTransform(32)(image)
    resized = image.resize((64, 32), Image.Resampling.BICUBIC)  # short side to 32, then the centre crop
    reference = np.asarray(resized, dtype=np.float32)[:, 16:48]
    ours = ((x + 1) * 127.5).permute(1, 2, 0).numpy()
    difference = np.abs(ours - reference)
    assert difference[:, 2:-2].max() <= 1.0  # identical geometry; only the crop edges see other neighbours


def test_random_crop_and_flip_follow_the_generator():
    array = np.random.default_rng(3).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    transform = ImageTransform(8, center_crop=False, random_flip=True)
    image = Image.fromarray(array)
    first = [transform(image, random.Random(5)) for _ in range(2)]
    assert torch.equal(first[0], first[1])  # same generator state, same crop and flip
    outputs = {tuple(transform(image, random.Random(seed)).flatten()[:16].tolist()) for seed in range(20)}
    assert len(outputs) > 10


def test_small_image_is_upscaled():
    x = ImageTransform(32)(Image.new("RGB", (8, 12), (255, 0, 0)))
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], torch.ones(32, 32))


def test_uint8_output_maps_to_the_float_output_exactly():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8))
    pixels = ImageTransform(16, uint8=True)(image, random.Random(0))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
    expected = ImageTransform(16)(image, random.Random(0))
    assert torch.equal(to_model_range(pixels[None])[0], expected)
    assert to_model_range(expected) is expected  # float input passes through
