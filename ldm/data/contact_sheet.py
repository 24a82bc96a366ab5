"""Contact sheets: a grid of thumbnails with their captions wrapped below (data_scripts/inspect_shards.py)."""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ldm.data.transforms import to_rgb


@dataclass(frozen=True)
class SheetLayout:
    """Contact sheet geometry: ``columns`` cells of a ``thumb`` px square and ``caption_lines`` lines."""

    thumb: int = 160
    columns: int = 8
    caption_lines: int = 4
    padding: int = 8

    @functools.cached_property
    def font(self) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
        return ImageFont.load_default()

    @property
    def line_height(self) -> int:
        left, top, right, bottom = self.font.getbbox("Ag|")
        return bottom + 2

    def cell(self) -> tuple[int, int]:
        """(width, height) of one cell, padding on the right/bottom included."""
        return self.thumb + self.padding, self.thumb + 2 + self.caption_lines * self.line_height + self.padding

    def size(self, count: int) -> tuple[int, int]:
        """(width, height) in px of a sheet of ``count`` samples."""
        columns = max(1, min(self.columns, count))
        rows = max(1, math.ceil(count / columns))
        cell_width, cell_height = self.cell()
        return self.padding + columns * cell_width, self.padding + rows * cell_height


def thumbnail(data: bytes, size: int) -> Image.Image:
    """Image file bytes -> an RGB image scaled (up or down, aspect kept) to fit a ``size`` px square."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size
        return ImageOps.contain(to_rgb(image), (size, size), Image.Resampling.BICUBIC)


def wrap_text(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` px; words wider than a line are split; '...' marks a cut."""
    measure = functools.partial(ImageDraw.Draw(Image.new("L", (1, 1))).textlength, font=font)
    lines: list[str] = []
    line = ""
    for word in text.split():
        while measure(word) > width:  # split an over-long word at its longest fitting prefix
            cut = 1
            while cut < len(word) and measure(word[: cut + 1]) <= width:
                cut += 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if measure(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def contact_sheet(samples: list[tuple[Image.Image, str]], layout: SheetLayout = SheetLayout()) -> Image.Image:
    """A grid of thumbnails, each centred in a ``layout.thumb`` square, its caption wrapped below."""
    sheet = Image.new("RGB", layout.size(len(samples)), "white")
    draw = ImageDraw.Draw(sheet)
    columns = max(1, min(layout.columns, len(samples)))
    cell_width, cell_height = layout.cell()
    for index, (image, caption) in enumerate(samples):
        x = layout.padding + (index % columns) * cell_width
        y = layout.padding + (index // columns) * cell_height
        draw.rectangle([x, y, x + layout.thumb - 1, y + layout.thumb - 1], fill=(230, 230, 230))
        sheet.paste(image, (x + (layout.thumb - image.width) // 2, y + (layout.thumb - image.height) // 2))
        lines = wrap_text(caption or "(no caption)", layout.font, layout.thumb, layout.caption_lines)
        for number, line in enumerate(lines):
            draw.text((x, y + layout.thumb + 2 + number * layout.line_height), line, fill="black", font=layout.font)
    return sheet
