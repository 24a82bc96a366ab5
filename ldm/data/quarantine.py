"""Quarantine by key: a sample that kills its loader worker is stepped over by the resumed run.

A decoder segfault or an out-of-memory kill ends the process before any ``except`` runs, and a
resumed run replays the same data position, so without a record it dies on the same sample again,
every time. Three files in the quarantine directory (``data.quarantine``) make the record:

- ``inflight-<split>-r<rank>-w<worker>``: the key the worker is decoding now, written before the
  decode and blanked after it (two ``pwrite`` calls of a few bytes into the page cache per sample,
  no fsync: a killed process loses nothing it wrote, only a lost machine does, and then the sample
  is not to blame).
- ``crashes.jsonl``: at start, each worker moves a key it finds still in flight (its predecessor
  with the same rank, worker and split died while decoding it) into this log.
- ``quarantine.jsonl``: the keys skipped (and counted as ``skipped/quarantined``). A key enters it
  once it has been in flight at ``strikes`` deaths (default 2): a job killed from outside (a
  preemption, a node failure) also leaves one key per worker in flight, innocent ones that must not
  be dropped, while a sample that kills its worker does so at every attempt. Users may add lines
  (``{"key": "000123"}`` in any shard, or ``{"url": URL, "key": KEY}``) and delete them to release a key.

One JSON object per line: ``{"url": shard URL, "key": sample key}``. Costs nothing when
``data.quarantine`` is null.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CRASHES = "crashes.jsonl"
QUARANTINE = "quarantine.jsonl"
DEFAULT_STRIKES = 2


def _record(url: str, key: str) -> str:
    return json.dumps({"url": url, "key": key}, ensure_ascii=True)


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (unreadable lines are ignored; a missing file is empty)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            yield entry


def _append(path: Path, line: str) -> None:
    """Append one line with a single write (O_APPEND: concurrent writers do not interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class Quarantine:
    """The quarantine of one loader worker (see the module docstring).

    directory: where the records live (created if missing); under the run's directory, so that the
        resumed run finds them.
    strikes: deaths a key must have been in flight at before it is quarantined (1: at the first).
    """

    def __init__(self, directory: str | os.PathLike, strikes: int = DEFAULT_STRIKES):
        if strikes < 1:
            raise ValueError(f"quarantine strikes must be at least 1, not {strikes}")
        self.directory = Path(directory)
        self.strikes = strikes
        self.keys: frozenset[str] = frozenset()  # "key" (any shard) and "url\0key" entries
        self.fd: int | None = None

    def start(self, split: str, rank: int, worker: int) -> None:
        """Begin a worker's stream: log the key its predecessor died on, load the quarantine list,
        and open this worker's in-flight record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.fd is not None:
            os.close(self.fd)
        path = self.directory / f"inflight-{split}-r{rank}-w{worker}"
        try:
            left = path.read_bytes().split(b"\n", 1)[0]
        except FileNotFoundError:
            left = b""
        try:
            entry = json.loads(left) if left.strip() else None
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            self._strike(entry, f"{split}-r{rank}-w{worker}")
        self.keys = frozenset(
            entry["key"] if "url" not in entry else f"{entry['url']}\0{entry['key']}"
            for entry in _lines(self.directory / QUARANTINE)
        )
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(self.fd, b"\n", 0)

    def _strike(self, entry: Mapping[str, Any], worker: str) -> None:
        """Log a death on ``entry``; quarantine its key once it has ``strikes`` of them."""
        url, key = str(entry.get("url", "")), str(entry.get("key", ""))
        _append(self.directory / CRASHES, json.dumps({"url": url, "key": key, "worker": worker, "time": time.time()}))
        deaths = Counter((e.get("url"), e["key"]) for e in _lines(self.directory / CRASHES))
        listed = any(e["key"] == key and e.get("url", url) == url for e in _lines(self.directory / QUARANTINE))
        if deaths[(url, key)] >= self.strikes and not listed:
            _append(self.directory / QUARANTINE, _record(url, key))

    def holds(self, url: str, key: str) -> bool:
        """Whether the sample ``key`` of shard ``url`` is quarantined (as loaded by ``start``)."""
        return bool(self.keys) and (key in self.keys or f"{url}\0{key}" in self.keys)

    def begin(self, url: str, key: str) -> None:
        """Record ``key`` as in flight (overwrites the start of the record; the first line counts)."""
        if self.fd is not None:
            os.pwrite(self.fd, (_record(url, key) + "\n").encode(), 0)

    def end(self) -> None:
        """The sample in flight is done (decoded, skipped or failed with an exception)."""
        if self.fd is not None:
            os.pwrite(self.fd, b"\n", 0)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "fd": None}  # each loader worker opens its own record
