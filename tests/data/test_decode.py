"""Image bytes -> upright RGB: every format and mode, EXIF orientation, JPEG draft, pixel limits."""

import io

import numpy as np
import pytest
from PIL import Image
from shard_corpus import image_bytes, png_header_only

from ldm.data.decode import decode_image
from ldm.data.skips import SkipSample

RED = (200, 30, 30)


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, mode",
    [
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "P"),
        ("PNG", "1"),
        ("PNG", "RGBA"),
        ("PNG", "LA"),
        ("PNG", "I;16"),
        ("WEBP", "RGB"),
        ("WEBP", "RGBA"),
    ],
)
def test_every_format_and_mode_decodes_to_rgb(fmt, mode):
    source = Image.new("RGB", (20, 12), RED).convert(mode)
    image = decode_image(_encode(source, fmt))
    assert image.mode == "RGB" and image.size == (20, 12)
    expected = np.asarray(source.convert("RGB"), dtype=float).mean(axis=(0, 1))
    if mode != "I;16":  # (PIL's own I;16 -> RGB clips; ours scales, checked below)
        assert np.allclose(np.asarray(image, dtype=float).mean(axis=(0, 1)), expected, atol=12)


def test_palette_transparency_and_alpha_become_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0] * 256)
    for data in (
        _encode(palette, "PNG", transparency=0),
        _encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"),
        _encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "WEBP", lossless=True),
    ):
        assert np.asarray(decode_image(data))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_png_keeps_its_brightness():
    array = np.full((4, 4), 32768, dtype=np.uint16)
    array[0, 0] = 65535
    rgb = np.asarray(decode_image(_encode(Image.fromarray(array), "PNG")))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 1].tolist() == [128, 128, 128]


@pytest.mark.parametrize("orientation, top_colour", [(1, None), (3, None), (6, "red"), (8, "blue")])
def test_exif_orientation_is_applied(orientation, top_colour):
    stored = np.zeros((20, 30, 3), dtype=np.uint8)  # (h, w): left third red, the rest blue
    stored[:, :10] = (255, 0, 0)
    stored[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = np.asarray(decode_image(_encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)))
    if orientation in (1, 3):
        assert image.shape[:2] == (20, 30)
        red_left = image[10, 2, 0] > 200
        assert red_left == (orientation == 1)  # 3: turned half a turn, red on the right
    else:  # 6: turn clockwise, the left edge goes to the top; 8: counter-clockwise, to the bottom
        assert image.shape[:2] == (30, 20)
        assert (image[2, 10, 0] > 200) == (top_colour == "red")
        assert (image[27, 10, 2] > 200) == (top_colour == "red")


def test_large_jpeg_decodes_at_a_reduced_scale_that_keeps_the_short_side():
    data = image_bytes((1024, 768), RED, "JPEG")
    assert decode_image(data).size == (1024, 768)
    assert decode_image(data, min_side=64).size == (128, 96)  # 1/8 scale, decoded as such
    assert decode_image(data, min_side=100).size == (256, 192)  # 1/4: 1/8 would leave 96 < 100
    assert decode_image(image_bytes((1024, 768), RED, "PNG"), min_side=64).size == (1024, 768)  # PNG: no draft


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    with pytest.raises(SkipSample) as skip:
        decode_image(png_header_only(3000, 3000), max_pixels=1_000_000)
    assert skip.value.reason == "too_many_pixels"
    with pytest.raises(SkipSample) as skip:  # over PIL's own bomb limit, whatever max_pixels says
        decode_image(png_header_only(100_000, 100_000), max_pixels=None)
    assert skip.value.reason == "too_many_pixels"
    assert decode_image(image_bytes((1000, 1000)), max_pixels=1_000_000).size == (1000, 1000)


def test_small_images_are_skipped_or_kept():
    data = image_bytes((16, 40))
    with pytest.raises(SkipSample) as skip:
        decode_image(data, min_side=32, small_images="skip")
    assert skip.value.reason == "too_small"
    assert decode_image(data, min_side=32, small_images="upscale").size == (16, 40)
    assert decode_image(data, min_side=16, small_images="skip").size == (16, 40)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_image"),
        (b"GIF89a but not really", "corrupt_image"),
        (b"\x00" * 100, "corrupt_image"),
        (image_bytes((64, 64), fmt="JPEG")[:300], "corrupt_image"),  # truncated JPEG
        (image_bytes((64, 64), fmt="PNG")[:60], "corrupt_image"),  # truncated PNG
    ],
)
def test_bad_bytes_raise_skip_with_reason(data, reason):
    with pytest.raises(SkipSample) as skip:
        decode_image(data)
    assert skip.value.reason == reason
