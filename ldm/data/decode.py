"""Image bytes (jpg, png, webp) -> an upright RGB PIL image, or ``SkipSample`` saying why not.

Order matters for speed and safety: the header is read first (PIL reads no pixel data in
``Image.open``), so a decompression bomb or an image too small to use is rejected before any pixel
is decoded; JPEGs are then decoded directly at a reduced scale (``Image.draft``: the DCT decodes at
1/2, 1/4 or 1/8 size) when that still leaves the short side at least ``min_side``; EXIF orientation
is applied (phones store portraits sideways); every mode becomes 8-bit RGB (``to_rgb``).
"""

from __future__ import annotations

import io
import math
import warnings

from PIL import Image, ImageOps

from ldm.data.skips import CORRUPT_IMAGE, EMPTY_IMAGE, TOO_MANY_PIXELS, TOO_SMALL, SkipSample
from ldm.data.transforms import to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members and files read for training, in order of preference
# image files data_scripts/images_to_shards.py reads (it re-encodes what training cannot read)
SOURCE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SMALL_IMAGES = ("upscale", "skip")
EXIF_ORIENTATION = 0x0112


def decode_image(
    data: bytes,
    max_pixels: int | None = None,
    min_side: int | None = None,
    small_images: str = "upscale",
) -> Image.Image:
    """Decode ``data`` into an upright RGB image.

    max_pixels: images whose header declares more pixels (width x height) are skipped
        (``too_many_pixels``) before decoding; None leaves only PIL's own bomb limit (179 Mpx).
    min_side: the short side the caller needs (the training size): JPEGs decode at the smallest
        DCT scale that keeps it; with ``small_images="skip"`` a smaller image is skipped (``too_small``).
    Raises ``SkipSample`` with reason empty_image, corrupt_image, too_many_pixels or too_small.
    """
    if small_images not in SMALL_IMAGES:
        raise ValueError(f"small_images must be one of {SMALL_IMAGES}, not {small_images!r}")
    if not data:
        raise SkipSample(EMPTY_IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency notes, EXIF noise
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise SkipSample(TOO_MANY_PIXELS, str(error)) from None
        except Exception as error:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, ...
            raise SkipSample(CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from None
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise SkipSample(TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels} pixels")
        if min_side is not None and min(width, height) < min_side and small_images == "skip":
            raise SkipSample(TOO_SMALL, f"{width}x{height} < {min_side}")
        try:
            if image.format == "JPEG" and min_side is not None and min(width, height) > min_side:
                scale = min_side / min(width, height)
                image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            image = _upright(image)
            return to_rgb(image)
        except SkipSample:
            raise
        except Image.DecompressionBombError as error:
            raise SkipSample(TOO_MANY_PIXELS, str(error)) from None
        except Exception as error:  # noqa: BLE001 - truncated data, bad tables, ...
            raise SkipSample(CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if any; a broken EXIF block leaves the image as stored."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is not a reason to lose the image
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        return image
