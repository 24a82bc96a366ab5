"""Writing webdataset shards: the one tar writer of the project's shards (image, toy and latent shards).

A sample ``{"__key__": "000123", "jpg": b"...", "txt": "a cat", "json": "{...}"}`` becomes the members
``000123.jpg``, ``000123.json``, ``000123.txt`` (extensions in sorted order; a ``str`` is stored as UTF-8;
keys starting with ``_`` are not stored). Headers are those webdataset's ``TarWriter`` writes (mode
0444, owner ``bigdata``, tarfile's pax format: an extended header only for a name that needs one) with
a fixed mtime, so the same samples give byte-identical shards.

Atomicity (``ldm.atomic``): a shard is written under a hidden temporary name beside its final name,
fsynced, then renamed, so a shard name always holds a complete shard; ``abort`` (or an exception in
a ``ShardSequenceWriter``'s ``with`` block) deletes the partial file. Reading: ``ldm.data.shard_reader``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ldm import atomic

# fixed member mtime: byte-identical shards across runs (an int: a float makes tarfile add a PAX
# header to every member, doubling the size of small members)
TAR_MTIME = 0
MEMBER_MODE = 0o444  # read-only members, owned by "bigdata": webdataset's TarWriter's headers
MEMBER_OWNER = "bigdata"


class ShardWriter:
    """One shard at ``path``, written atomically: ``write`` adds a sample's members, ``close``
    publishes the shard, ``abort`` deletes it (the caller calls one of the two)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.num_samples = 0
        self._temp: Path | None = atomic.new_temporary(self.path)
        self._file: IO[bytes] | None = open(self._temp, "wb")  # noqa: SIM115 - closed by close/abort
        self._tar: tarfile.TarFile | None = tarfile.open(fileobj=self._file, mode="w|")

    def write(self, sample: Mapping[str, bytes | str]) -> None:
        """Add one sample: a member ``{key}.{ext}`` per extension, in sorted order (a str as UTF-8)."""
        key = sample["__key__"]
        values = {ext: value for ext, value in sample.items() if not ext.startswith("_")}
        for ext, value in values.items():
            if not isinstance(value, (bytes, str)):
                raise TypeError(f"sample {key}: member {ext} is a {type(value).__name__}, not bytes or str")
        for ext in sorted(values):
            data = values[ext].encode("utf-8") if isinstance(values[ext], str) else values[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, MEMBER_MODE
            info.uname = info.gname = MEMBER_OWNER
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def close(self) -> Path:
        """End the archive, fsync it and rename it to ``path``; returns ``path``."""
        self._tar.close()  # the end-of-archive blocks; our file stays open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        atomic.publish(self._temp, self.path)
        self._tar = self._file = self._temp = None
        return self.path

    def abort(self) -> None:
        """Delete the partial shard (``path`` keeps whatever it held before)."""
        if self._tar is not None:
            with contextlib.suppress(Exception):  # e.g. a full disk: the file goes anyway
                self._tar.close()
        if self._file is not None:
            self._file.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
        self._tar = self._file = self._temp = None


@dataclass(frozen=True)
class ShardInfo:
    """A published shard: its file name, samples and size in bytes."""

    name: str
    num_samples: int
    num_bytes: int


class ShardSequenceWriter:
    """Samples -> ``out_dir/{prefix}-NNNNNN.tar``, ``samples_per_shard`` each (the last may hold fewer;
    no samples: no shard). Each shard is a ``ShardWriter``; ``shards`` lists the published ones.
    Use as a context manager (an exception deletes the open shard; published ones stay)."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[ShardInfo] = []
        self._shard: ShardWriter | None = None

    def shard_name(self, number: int) -> str:
        return f"{self.prefix}-{number:06d}.tar"

    def write(self, sample: Mapping[str, bytes | str]) -> None:
        if self._shard is None:
            self._shard = ShardWriter(self.out_dir / self.shard_name(len(self.shards)))
        self._shard.write(sample)
        if self._shard.num_samples == self.samples_per_shard:
            self._finish()

    def close(self) -> None:
        """Publish the open shard, if any."""
        if self._shard is not None:
            self._finish()

    def abort(self) -> None:
        """Delete the open shard's partial file, if any; published shards stay."""
        if self._shard is not None:
            self._shard.abort()
        self._shard = None

    def __enter__(self) -> ShardSequenceWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _finish(self) -> None:
        shard, self._shard = self._shard, None
        path = shard.close()
        self.shards.append(ShardInfo(path.name, shard.num_samples, path.stat().st_size))
