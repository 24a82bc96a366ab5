"""Atomic file writes: every file the project writes appears whole or not at all.

A file is written under a hidden temporary name beside its target (``.{name}.XXXXXXXX.tmp``), flushed
and fsynced, given the usual permissions (``mkstemp`` makes files private), renamed over the target
(rename is atomic on POSIX file systems), and the directory is fsynced so the rename survives a power
loss. A process killed midway leaves the previous file intact and at most a temporary file, which
``is_temporary`` recognises so that cleanups can remove it. Checkpoints, model exports, shards,
latent shards, sample images, metadata and metrics all go through here.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"
# the temporary name of target NAME: mkstemp(prefix=".NAME.", suffix=".tmp") -> ".NAME.k2x_9abc.tmp"
# (tempfile's random part: 8 characters of [a-z0-9_])
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


def temporary_target(name: str) -> str | None:
    """The file name a temporary file named ``name`` stands for, or None if it is not one of ours."""
    match = _TEMP_NAME.fullmatch(name)
    return match["target"] if match else None


def new_temporary(path: str | os.PathLike) -> Path:
    """Create the empty temporary file that will become ``path`` (for writers that keep a file open
    across calls, like a shard writer; hand it to ``publish`` when written, or unlink it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (by any library); on success it replaces
    ``path`` atomically, on an exception it is removed and ``path`` is left as it was."""
    temp = new_temporary(path)
    try:
        yield temp
        with open(temp, "rb") as file:
            os.fsync(file.fileno())
        publish(temp, Path(path))
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically: the file is streamed to a temporary name and
    takes ``path``'s place only when the block ends without an exception (shards, JSON files)."""
    if not any(c in mode for c in "wx") or "+" in mode:
        raise ValueError(f"atomic_open writes new files: mode 'w'/'wb'/'x', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    temp = Path(name)
    try:
        with os.fdopen(fd, mode.replace("x", "w"), **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        publish(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as file:
        file.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as file:
        file.write(data)


def publish(temp: Path, path: Path) -> None:
    """Give the written and fsynced ``temp`` its final mode and rename it over ``path`` (atomic)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode any new file gets
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)
