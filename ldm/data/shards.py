"""Shard specifications: brace patterns, globs, lists and ``pipe:`` URLs -> a list of shard URLs;
weighted sources for mixing several datasets."""

from __future__ import annotations

import glob
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

from ldm.errors import UserError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")

ShardSpec = str | Sequence[str]


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


@dataclass(frozen=True)
class Source:
    """One dataset to draw training samples from: its shard URLs and its mixing weight."""

    urls: list[str]
    weight: float = 1.0
    spec: str = ""

    def describe(self) -> str:
        return self.spec or (self.urls[0] if len(self.urls) == 1 else f"{self.urls[0]} and {len(self.urls) - 1} more")


def resolve_sources(shards: ShardSpec | None, sources: Sequence[Mapping[str, Any]] | None) -> list[Source]:
    """The training sources: ``shards`` (one source) or ``sources``, a list of ``{shards: SPEC,
    weight: W}`` (weight defaults to 1; samples are drawn from each in proportion to its weight).
    Raises ``ShardSpecError`` naming what is wrong; a local spec matching nothing is an error.
    """
    if shards is not None and sources:
        raise ShardSpecError("set data.shards or data.sources, not both")
    if sources:
        resolved = []
        for index, entry in enumerate(sources):
            if not isinstance(entry, Mapping) or "shards" not in entry:
                raise ShardSpecError(f"data.sources[{index}] needs a 'shards' entry, got {entry!r}")
            unknown = set(entry) - {"shards", "weight", "name"}
            if unknown:
                raise ShardSpecError(f"data.sources[{index}] has unknown keys {sorted(unknown)}")
            weight = float(entry.get("weight", 1.0))
            if not (weight > 0 and math.isfinite(weight)):
                raise ShardSpecError(f"data.sources[{index}] weight must be positive, got {entry.get('weight')!r}")
            spec = entry["shards"]
            name = str(entry.get("name") or (spec if isinstance(spec, str) else f"sources[{index}]"))
            resolved.append(Source(expand_shards(spec), weight, name))
        return resolved
    if shards is None:
        raise ShardSpecError("no training data: set data.shards (or data.sources)")
    return [Source(expand_shards(shards), 1.0, shards if isinstance(shards, str) else "")]
