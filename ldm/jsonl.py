"""Reading line-based text files from outside (prompt lists, JSON Lines metadata) with bounded memory
and one-line errors naming the file and line.

Such files are untrusted: a line is read with a byte cap (a 100 MB line is never held whole), the
whole file with a byte cap, and the text must be UTF-8 (a leading byte-order mark is accepted).
"""

from __future__ import annotations

import codecs
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ldm.errors import UserError

MAX_JSONL_LINE_BYTES = 1 << 20  # a JSON record per line; a longer line is refused, not parsed
MAX_FILE_BYTES = 256 << 20  # read no more of one file than this (a prompt list of ~1M prompts is ~100 MB)
_READ_CHUNK = 1 << 16


def text_lines(
    path: Path, max_line_bytes: int, truncate: bool = False, max_bytes: int | None = None
) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without the newline, cut) of every line of a UTF-8 file, streamed.

    A line longer than ``max_line_bytes`` is cut to that many bytes (``truncate``; the rest is
    skipped without being kept) or refused; a file longer than ``max_bytes`` is refused once that
    many bytes were read (a regular file is refused up front by its size; default ``MAX_FILE_BYTES``)."""
    path = Path(path)
    max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
    if path.is_file() and path.stat().st_size > max_bytes:
        raise UserError(
            f"{path}: {path.stat().st_size / 2**20:.0f} MiB is more than the {max_bytes >> 20} MiB "
            "read from one file: split it into several jobs"
        )
    total = 0
    with open(path, "rb") as file:
        for number in itertools.count(1):
            raw = file.readline(max_line_bytes + 1)
            if not raw:
                return
            cut = len(raw) > max_line_bytes and not raw.endswith(b"\n")
            if cut:
                if not truncate:
                    raise UserError(f"{path}:{number}: line longer than {max_line_bytes} bytes")
                raw = raw[:max_line_bytes]
                total += _skip_rest_of_line(file)
            total += len(raw)
            if total > max_bytes:
                raise UserError(f"{path}: more than the {max_bytes >> 20} MiB read from one file: split it")
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield number, _decode(raw.rstrip(b"\r\n"), path, number, cut), cut


def _skip_rest_of_line(file: IO[bytes]) -> int:
    """Read past the end of the current line in small chunks; returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = file.readline(_READ_CHUNK)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _decode(raw: bytes, path: Path, number: int, cut: bool) -> str:
    """Strict UTF-8; a line cut by the byte cap may end inside a character, which is dropped."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}): "
            "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def jsonl_rows(path: Path, max_line_bytes: int = MAX_JSONL_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a bad line is a UserError naming it."""
    for number, line, _ in text_lines(path, max_line_bytes):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
            raise UserError(f"{path}:{number}: not JSON ({reason})") from None
