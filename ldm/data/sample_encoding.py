"""One input of data_scripts/images_to_shards.py (``ldm.data.corpus_inputs.SourceItem``) -> a
webdataset sample, or the reason it is skipped (named as the loader names it: ``ldm.data.skips``).

A sample is ``{key}.{jpg|png|webp}``, ``{key}.txt`` (the caption, stripped) and ``{key}.json``
(``width``, ``height`` of the stored image, ``original_width``, ``original_height``, ``source``, and
any extra table columns); the key is the input's position (``%09d``).

Encoding: JPEG, PNG and WebP files are stored byte for byte (no generation loss, no work), unless
they need a change: larger than ``max_side`` (downscaled, aspect kept) or rotated by an EXIF
orientation tag (turned upright, so that every reader, not only our loader, sees upright pixels
and the `.json` size matches them). Those, and every other format (BMP, TIFF, GIF, ...),
are re-encoded as RGB JPEG at quality 95; transparency is composited on white, as the loader does.
The stored extension follows the sniffed format, not the file name.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.data.corpus_inputs import SourceItem
from ldm.data.skips import (
    CORRUPT_CAPTION,
    CORRUPT_IMAGE,
    CORRUPT_METADATA,
    EMPTY_CAPTION,
    EMPTY_IMAGE,
    MISSING_FILE,
    TOO_MANY_PIXELS,
)
from ldm.data.transforms import to_rgb

# Formats stored as they are, by PIL format name -> webdataset extension (all decoded by the loader).
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 95
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Skipped:
    """An input that produced no sample, and why (a reason of ``ldm.data.skips``)."""

    index: int
    source: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class EncodedImage:
    extension: str  # webdataset member extension: jpg | png | webp
    data: bytes
    width: int  # of the stored image
    height: int
    original_width: int  # upright (after the EXIF orientation), before any downscale
    original_height: int


def encode_image(data: bytes, max_side: int | None = None) -> EncodedImage:
    """Image file bytes -> what to store; the image is fully decoded, so a corrupt file raises.

    Kept byte for byte when JPEG/PNG/WebP, upright and within ``max_side``; otherwise downscaled
    (longest side <= max_side, aspect kept, Lanczos) and/or turned upright, and re-encoded as
    RGB JPEG quality 95. Raises whatever PIL raises for unreadable data.
    """
    with Image.open(io.BytesIO(data)) as image:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        width, height = image.size
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        too_large = max_side is not None and max(width, height) > max_side
        if image.format in KEPT_FORMATS and orientation == 1 and not too_large:
            image.load()  # full decode: a truncated or corrupt file raises here
            return EncodedImage(KEPT_FORMATS[image.format], data, width, height, width, height)
        if too_large:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # JPEG: DCT-scaled decode
        else:
            image.load()
        rgb = to_rgb(ImageOps.exif_transpose(image))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return EncodedImage("jpg", buffer.getvalue(), rgb.width, rgb.height, *upright)


def _read_caption(item: SourceItem) -> str | Skipped:
    """The stripped caption; a missing one (no ``x.txt``, a null cell) skips the input as
    ``empty_caption`` (an empty one is kept), a caption file that is not UTF-8 as ``corrupt_caption``."""
    if item.caption is not None:
        return item.caption.strip()
    if item.caption_file is None:
        return Skipped(item.index, item.source, EMPTY_CAPTION)
    try:
        return Path(item.caption_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return Skipped(item.index, item.source, EMPTY_CAPTION, item.caption_file)
    except UnicodeDecodeError as error:
        return Skipped(item.index, item.source, CORRUPT_CAPTION, f"{type(error).__name__}: {error}")
    except OSError as error:  # a directory, no permission
        return Skipped(item.index, item.source, MISSING_FILE, f"{type(error).__name__}: {error}")


def _read_image(item: SourceItem, max_side: int | None) -> EncodedImage | Skipped:
    """The image to store, or why not (reasons as the loader's decoder names them)."""
    if item.path is None:
        return Skipped(item.index, item.source, CORRUPT_METADATA, "no path")
    try:
        data = Path(item.path).read_bytes()
    except OSError as error:  # not found, a directory, no permission
        return Skipped(item.index, item.source, MISSING_FILE, f"{type(error).__name__}: {error}")
    if not data:
        return Skipped(item.index, item.source, EMPTY_IMAGE)
    try:
        return encode_image(data, max_side)
    except Image.DecompressionBombError as error:
        return Skipped(item.index, item.source, TOO_MANY_PIXELS, str(error))
    except UnidentifiedImageError:
        return Skipped(item.index, item.source, CORRUPT_IMAGE, "not an image format PIL reads")
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return Skipped(item.index, item.source, CORRUPT_IMAGE, f"{type(error).__name__}: {error}")


def make_sample(item: SourceItem, max_side: int | None = None) -> dict[str, Any] | Skipped:
    """One input -> a webdataset sample ``{__key__, jpg|png|webp, txt, json}``, or why it was skipped."""
    caption = _read_caption(item)
    if isinstance(caption, Skipped):
        return caption
    image = _read_image(item, max_side)
    if isinstance(image, Skipped):
        return image
    meta = {
        **item.extra,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "source": item.source,
    }
    return {
        "__key__": f"{item.index:09d}",
        image.extension: image.data,
        "txt": caption,
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True),
    }
