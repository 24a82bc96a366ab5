"""Shared plumbing of the command-line entry points: one-line errors, checkpoint lookup."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import InstantiationException

from ldm.errors import UserError

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError)


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Report a user's mistake as ``error: <what and where>`` on stderr and exit 1, without a trace."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - anything else is re-raised untouched
        cause = _root_cause(error)
        if not isinstance(cause, USER_ERRORS):
            raise
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def newest_checkpoint(directory: Path) -> Path | None:
    """``last.ckpt`` if present, else the most recently written ``*.ckpt`` under ``directory``."""
    if (directory / "last.ckpt").is_file():
        return directory / "last.ckpt"
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
