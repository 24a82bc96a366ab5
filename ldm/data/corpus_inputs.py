"""The inputs of data_scripts/images_to_shards.py: the images of a folder (with sidecar captions), or
the rows of a CSV/TSV/JSONL table, in a fixed order (a sample's key is its position in it).

Nothing is read here but the folder listing and the table: images and caption files are read by the
encoding workers (``ldm.data.sample_encoding``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.data.decode import SOURCE_IMAGE_SUFFIXES
from ldm.errors import UserError

# the sample .json fields written by the encoder; a table column of one of these names gets a table_ prefix
RESERVED_JSON_KEYS = ("width", "height", "original_width", "original_height", "source")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}  # table format -> CSV delimiter (None: JSON lines)


@dataclass(frozen=True)
class SourceItem:
    """One input: an image file and its caption (given, or read from ``caption_file`` by a worker)."""

    index: int  # position in the input order; the sample key
    path: str | None  # where to read the image; None: the table row names none
    source: str  # what `.json` records: the path relative to the folder, or as written in the table
    caption: str | None = None  # None and no caption_file: the caption is missing
    caption_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def folder_items(root: str | os.PathLike) -> list[SourceItem]:
    """Every image under ``root`` (recursively, hidden names skipped), sorted by relative path.

    The caption of ``a/x.jpg`` is ``a/x.txt``; it is read by the worker, and its absence skips the
    image (``empty_caption``).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"input folder {root} does not exist")
    relative = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.suffix.lower() in SOURCE_IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    )
    return [
        SourceItem(
            index=index,
            path=str(root / name),
            source=name,
            caption_file=str((root / name).with_suffix(".txt")),
        )
        for index, name in enumerate(relative)
    ]


def _table_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV/TSV (header line required) or JSONL file, as dicts."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UserError(f"{path}: unknown table format; expected one of {', '.join(TABLE_SUFFIXES)}")
    with open(path, newline="", encoding="utf-8") as file:
        if suffix == ".jsonl":
            for number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as error:
                        raise UserError(f"{path}:{number}: not a JSON object ({error})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}:{number}: not a JSON object")
                    yield row
        else:
            yield from csv.DictReader(file, delimiter=TABLE_SUFFIXES[suffix])


def count_table_rows(path: str | os.PathLike) -> int:
    """Number of rows of a table (one parsing pass; for the progress bar)."""
    return sum(1 for _ in _table_rows(Path(path)))


def _merge_extra(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    """Table fields other than ``used``; a field named like one of ours gets a ``table_`` prefix."""
    return {
        (f"table_{name}" if name in RESERVED_JSON_KEYS else name): value
        for name, value in row.items()
        if name not in used and name is not None  # None: a CSV row's cells beyond the header
    }


def table_items(
    table: str | os.PathLike,
    root: str | os.PathLike | None = None,
    path_column: str = "path",
    caption_column: str = "caption",
) -> Iterator[SourceItem]:
    """Inputs listed in a CSV/TSV/JSONL table, in row order; streamed, so tables may be huge.

    Relative image paths resolve against ``root`` (default: the table's folder). Other columns go to
    the sample's `.json`. A missing or null caption skips the row (``empty_caption``), a missing
    path likewise (``corrupt_metadata``); an empty CSV cell is an empty caption, kept (CSV cannot
    tell the two apart). A CSV/TSV header without the two columns raises.
    """
    table = Path(table)
    if not table.is_file():
        raise UserError(f"input table {table} does not exist")
    base = Path(root) if root is not None else table.parent
    for index, row in enumerate(_table_rows(table)):
        if index == 0 and table.suffix.lower() != ".jsonl":  # a CSV header names every column
            for column, option in ((path_column, "--path-column"), (caption_column, "--caption-column")):
                if column not in row:
                    raise UserError(f"{table}: no column {column!r} (see {option})")
        caption = row.get(caption_column)
        source = row.get(path_column)
        yield SourceItem(
            index=index,
            path=None if source is None else str(base / str(source)),
            source="" if source is None else str(source),
            caption=None if caption is None else str(caption),
            extra=_merge_extra(row, (path_column, caption_column)),
        )


def corpus_items(
    source: str | os.PathLike,
    root: str | os.PathLike | None = None,
    path_column: str = "path",
    caption_column: str = "caption",
) -> tuple[Iterable[SourceItem], int]:
    """The inputs of a folder or table, and their number (for the progress bar)."""
    source = Path(source)
    if source.is_dir():
        items = folder_items(source)
        return items, len(items)
    return table_items(source, root, path_column, caption_column), count_table_rows(source)
