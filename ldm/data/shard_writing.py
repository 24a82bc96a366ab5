"""Image-caption corpora (a folder with sidecar captions, or a CSV/TSV/JSONL table) -> webdataset shards:
the driver of data_scripts/images_to_shards.py and its summary.

The parts: ``ldm.data.corpus_inputs`` lists the inputs, ``ldm.data.sample_encoding`` turns one into a
sample (or a skip reason of ``ldm.data.skips``), ``ldm.data.ordered_map`` runs that over worker
processes, ``ldm.data.shard_writer`` writes the shards.

Determinism: one writer, in this process, receives encoded samples in input order whatever the
number of workers, and tar headers carry a fixed mtime, so one input order gives byte-identical shards.
Atomicity: a shard is written under a hidden temporary name, fsynced, then renamed, so a name
``{prefix}-NNNNNN.tar`` always holds a complete shard; ``{prefix}.manifest.json`` is written last
and marks the whole run complete.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm import atomic
from ldm.data.corpus_inputs import SourceItem
from ldm.data.ordered_map import ordered_map
from ldm.data.sample_encoding import Skipped, make_sample
from ldm.data.shard_writer import ShardInfo, ShardSequenceWriter
from ldm.errors import UserError


@dataclass
class WriteSummary:
    """What `write_shards` did: written shards, skipped inputs counted by reason, wall time."""

    out_dir: str
    prefix: str
    num_inputs: int = 0
    num_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[Skipped] = field(default_factory=list)  # the first MAX_EXAMPLES
    seconds: float = 0.0

    MAX_EXAMPLES = 20

    def add_skipped(self, skipped: Skipped) -> None:
        self.skipped[skipped.reason] += 1
        if len(self.skipped_examples) < self.MAX_EXAMPLES:
            self.skipped_examples.append(skipped)

    def line(self) -> str:
        """One-line summary, e.g. 'wrote 998 samples in 1 shard ...; skipped 2 of 1000 inputs: ...'."""
        size = sum(shard.num_bytes for shard in self.shards) / 1e6
        text = (
            f"wrote {self.num_samples} samples in {len(self.shards)} shard(s) ({size:.1f} MB) to "
            f"{self.out_dir}/{self.prefix}-*.tar in {self.seconds:.1f} s"
        )
        total_skipped = sum(self.skipped.values())
        if total_skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            text += f"; skipped {total_skipped} of {self.num_inputs} inputs: {reasons}"
        else:
            text += f"; skipped 0 of {self.num_inputs} inputs"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "num_inputs": self.num_inputs,
            "num_samples": self.num_samples,
            "shards": [vars(shard) for shard in self.shards],
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": [vars(skipped) for skipped in self.skipped_examples],
        }


def manifest_path(out_dir: str | os.PathLike, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}.manifest.json"


def existing_outputs(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Shards and manifest of an earlier run with this prefix in ``out_dir``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    shard = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    found = sorted(path for path in out_dir.iterdir() if shard.fullmatch(path.name))
    manifest = manifest_path(out_dir, prefix)
    return found + ([manifest] if manifest.exists() else [])


def write_shards(
    items: Iterable[SourceItem],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    total: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteSummary:
    """Encode ``items`` (in order) and write them as shards ``out_dir/{prefix}-NNNNNN.tar``.

    Skipped inputs are counted by reason, never fatal. With ``overwrite`` an earlier run's shards
    are replaced one by one and its extra shards deleted at the end; without it they raise. The
    manifest ``{prefix}.manifest.json`` (the summary) is written last. ``total`` sizes the bar.
    """
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise UserError("samples_per_shard must be >= 1")
    if max_side is not None and max_side < 1:
        raise UserError("max_side must be >= 1")
    if not re.fullmatch(r"[\w.-]+", prefix):
        raise UserError(f"prefix {prefix!r} must be letters, digits, '_', '-' or '.'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = existing_outputs(out_dir, prefix)
    if earlier and not overwrite:
        raise UserError(f"{out_dir} already holds {prefix}-*.tar shards (e.g. {earlier[0].name}); pass --overwrite")
    manifest_path(out_dir, prefix).unlink(missing_ok=True)  # the directory is incomplete until the end

    start = time.perf_counter()
    summary = WriteSummary(out_dir=str(out_dir), prefix=prefix)
    encode = functools.partial(make_sample, max_side=max_side)
    with (
        ShardSequenceWriter(out_dir, prefix, samples_per_shard) as writer,
        tqdm(total=total, desc=f"{prefix}-*.tar", unit="img", disable=not progress) as bar,
    ):
        for result in ordered_map(encode, items, workers):
            summary.num_inputs += 1
            if isinstance(result, Skipped):
                summary.add_skipped(result)
                bar.set_postfix(skipped=sum(summary.skipped.values()), refresh=False)
            else:
                writer.write(result)
                summary.num_samples += 1
            bar.update(1)
    summary.shards = writer.shards
    written = {shard.name for shard in writer.shards}
    for path in earlier:  # an earlier, longer run's extra shards
        if path.name not in written:
            path.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start
    manifest = {**summary.to_dict(), "samples_per_shard": samples_per_shard, "max_side": max_side}
    atomic.write_text(manifest_path(out_dir, prefix), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return summary
