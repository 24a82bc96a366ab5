"""Reading JSON Lines files (prompt lists, sample metadata) with one-line errors naming the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ldm.errors import UserError


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a bad line is a UserError naming it."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not JSON ({error.msg})") from error
