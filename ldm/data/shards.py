"""Shard specifications: brace patterns, globs, lists and ``pipe:`` URLs -> a list of shard URLs."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import braceexpand

from ldm.errors import UserError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


class ShardSpecError(UserError, ValueError):
    """A shard specification that names no readable shard."""


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand ``spec`` into shard URLs, checking that local shards exist.

    ``spec`` is a brace pattern (``/data/{00000..00099}.tar``), a glob (``/data/train-*.tar``), a
    ``pipe:`` / http(s) URL (not checked: it is read by a command), or a list of any of these.
    A local pattern matching no file raises ``ShardSpecError`` naming it.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardSpecError("empty shard specification")
    urls: list[str] = []
    for item in specs:
        urls.extend(_expand_one(str(item)))
    return urls


def _expand_one(spec: str) -> list[str]:
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(spec))
    urls: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        pattern = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        urls.extend(m for m in matches if Path(m).is_file())
    if not urls:
        raise ShardSpecError(f"no shard found for {spec!r}")
    missing = [p for p in braceexpand.braceexpand(spec) if not glob.has_magic(p) and not Path(p).expanduser().is_file()]
    if missing:
        raise ShardSpecError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    return urls
