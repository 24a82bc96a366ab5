"""Batch sampling jobs: thousands of prompts over every GPU of every node, resumable, reproducible.

The job is a fixed list of items (prompt, seed, carried fields) numbered 0..N-1: item i*n + j is
image j of prompt i, with seed ``seed + i*n + j``. Rank r of W takes items r, r + W, ...; an item
is done when its output exists (files are written atomically), so a rerun after a crash only
makes what is missing, and the final set is the same as an uninterrupted run's. ``metadata.jsonl``
is rebuilt from the job list at the end, so it always matches the images on disk.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.checkpoints import _atomic_path
from ldm.errors import UserError
from ldm.jsonl import jsonl_rows


@dataclass(frozen=True)
class JobItem:
    index: int
    prompt: str
    seed: int
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


# ---------------------------------------------------------------- prompts
def read_prompt_records(prompt: str | None, prompts_file: str | None, prompts_shards: Any = None) -> list[dict[str, Any]]:
    """Prompts as records {"prompt": str, ...fields to carry}: one prompt, a text file (a prompt a
    line), a JSONL file (a "prompt" or "caption" field per line; other fields are carried into
    the metadata), or webdataset shards of captions (.txt members; key and .json carried)."""
    given = [x for x in (prompt, prompts_file, prompts_shards) if x is not None]
    if len(given) != 1:
        raise UserError("give exactly one of prompt=..., prompts_file=... or prompts_shards=...")
    if prompt is not None:
        return [{"prompt": str(prompt)}]
    if prompts_shards is not None:
        return _records_from_shards(prompts_shards)
    path = Path(prompts_file).expanduser()
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    records = _records_from_jsonl(path) if path.suffix == ".jsonl" else _records_from_text(path)
    if not records:
        raise UserError(f"prompts file is empty: {path}")
    return records


def _records_from_text(path: Path) -> list[dict[str, Any]]:
    return [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]


def _records_from_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: each line must be a JSON object")
        text = row.pop("prompt", None) or row.pop("caption", None)
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: no 'prompt' or 'caption' string")
        records.append({"prompt": text, **row})
    return records


def _records_from_shards(spec: Any) -> list[dict[str, Any]]:
    from ldm.data.shards import expand_shards

    records = []
    for url in expand_shards(spec):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    key = member.name[: -len(".txt")]
                    text = tar.extractfile(member).read().decode("utf-8").strip()
                    records.append({"prompt": text, "key": key, "shard": Path(url).name})
    return records


def job_items(records: Sequence[dict[str, Any]], images_per_prompt: int, seed: int) -> list[JobItem]:
    """The whole job, in a fixed order (the same on every rank and every rerun)."""
    items = []
    for i, record in enumerate(records):
        fields = {k: v for k, v in record.items() if k != "prompt"}
        for j in range(images_per_prompt):
            index = i * images_per_prompt + j
            items.append(JobItem(index, record["prompt"], seed + index, fields))
    return items


# ---------------------------------------------------------------- outputs
class FolderOutput:
    """One PNG per item (``000123.png``), written atomically; ``metadata.jsonl`` at the end."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def done(self, item: JobItem) -> bool:
        return (self.directory / f"{item.name}.png").is_file()

    def files_of(self, mine: Sequence[JobItem], items: Sequence[JobItem]) -> set[str]:
        """Names of the files that only this rank writes."""
        return {f"{item.name}.png" for item in mine}

    def write(self, item: JobItem, image: np.ndarray) -> None:
        with _atomic_path(self.directory / f"{item.name}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")

    def finalize(self, items: Sequence[JobItem], row: Callable[[JobItem], dict[str, Any]]) -> int:
        present = [item for item in items if self.done(item)]
        with _atomic_path(self.directory / "metadata.jsonl") as tmp:
            tmp.write_text("".join(json.dumps({"file": f"{i.name}.png", **row(i)}) + "\n" for i in present))
        return len(present)


class ShardOutput:
    """webdataset shards of ``samples_per_shard`` items (``.png`` + ``.json``); a shard is written
    atomically once all its items are made, so a shard either exists whole or not at all."""

    def __init__(self, directory: str | Path, samples_per_shard: int, row: Callable[[JobItem], dict[str, Any]]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.row = row
        self.pending: dict[int, dict[int, tuple[JobItem, np.ndarray]]] = {}

    def shard_of(self, item: JobItem) -> int:
        return item.index // self.samples_per_shard

    def path(self, shard: int) -> Path:
        return self.directory / f"samples-{shard:06d}.tar"

    def done(self, item: JobItem) -> bool:
        return self.path(self.shard_of(item)).is_file()

    def files_of(self, mine: Sequence[JobItem], items: Sequence[JobItem]) -> set[str]:
        """Names of the shards whose items all belong to this rank (only it writes them)."""
        everyone, own = Counter(self.shard_of(i) for i in items), Counter(self.shard_of(i) for i in mine)
        return {self.path(shard).name for shard, count in own.items() if everyone[shard] == count}

    def write(self, item: JobItem, image: np.ndarray, shard_items: Sequence[JobItem]) -> None:
        shard = self.shard_of(item)
        self.pending.setdefault(shard, {})[item.index] = (item, image)
        if len(self.pending[shard]) == len(shard_items):
            self._write_shard(shard, [self.pending[shard][i.index] for i in shard_items])
            del self.pending[shard]

    def _write_shard(self, shard: int, entries: list[tuple[JobItem, np.ndarray]]) -> None:
        with _atomic_path(self.path(shard)) as tmp, tarfile.open(tmp, "w") as tar:
            for item, image in entries:
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                _add_member(tar, f"{item.name}.png", png.getvalue())
                _add_member(tar, f"{item.name}.json", json.dumps(self.row(item)).encode())

    def finalize(self, items: Sequence[JobItem], row: Callable[[JobItem], dict[str, Any]]) -> int:
        return sum(1 for item in items if self.done(item))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- distribution
@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environment(cls) -> Ranks:
        """torchrun and SLURM (srun) set these; a plain `python sample.py` is rank 0 of 1."""
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return cls(rank, world, local)

    def mine(self, items: Sequence[JobItem]) -> list[JobItem]:
        return list(items[self.rank :: self.world_size])


def init_process_group(ranks: Ranks, device: torch.device) -> bool:
    """A process group for the final barrier and counts, when there are several ranks."""
    import torch.distributed as dist

    if ranks.world_size == 1 or dist.is_initialized():
        return dist.is_initialized()
    if "MASTER_ADDR" not in os.environ:
        raise UserError("several ranks but no MASTER_ADDR: launch with torchrun or srun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    return True


def batches_of(items: Sequence[JobItem], size: int) -> Iterable[list[JobItem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def remove_stale_temporaries(directory: Path, names: set[str]) -> int:
    """Delete the hidden ``.NAME.XXXX.tmp`` files that a killed run left for these target names.

    Only this rank's targets: another rank may be writing its own temporaries right now. One
    directory listing, whatever the number of names. Returns how many were removed."""
    removed = 0
    for path in directory.iterdir():
        name = path.name
        if name.startswith(".") and name.endswith(".tmp") and name[1:].rsplit(".", 2)[0] in names:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def run_job(
    items: Sequence[JobItem],
    generate: Callable[[list[str], list[int]], torch.Tensor],
    output: FolderOutput | ShardOutput,
    ranks: Ranks,
    batch_size: int,
    row: Callable[[JobItem], dict[str, Any]],
) -> dict[str, Any]:
    """Make this rank's missing items in batches; returns counts (made, skipped, seconds)."""
    mine = ranks.mine(items)
    remove_stale_temporaries(output.directory, output.files_of(mine, items))
    todo = [item for item in mine if not output.done(item)]
    by_shard: dict[int, list[JobItem]] = {}
    if isinstance(output, ShardOutput):
        for item in mine:
            by_shard.setdefault(output.shard_of(item), []).append(item)
        # a shard's items all belong to one rank only when the shard size is a multiple of W
        todo.sort(key=lambda item: item.index)
    start = time.perf_counter()
    made = 0
    with tqdm(total=len(todo), desc=f"sampling (rank {ranks.rank})", unit="img", disable=ranks.rank != 0) as bar:
        for batch in batches_of(todo, batch_size):
            pixels = generate([item.prompt for item in batch], [item.seed for item in batch])
            for item, image in zip(batch, _to_uint8(pixels)):
                if isinstance(output, ShardOutput):
                    output.write(item, image, by_shard[output.shard_of(item)])
                else:
                    output.write(item, image)
            made += len(batch)
            bar.update(len(batch))
    return {"made": made, "skipped": len(mine) - len(todo), "seconds": time.perf_counter() - start}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
