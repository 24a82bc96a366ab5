"""Batch sampling jobs: thousands of prompts over every GPU of every node, resumable, reproducible.

The job is a fixed list of items (prompt, seed, carried fields) numbered 0..N-1: item i*n + j is
image j of prompt i, with seed ``seed + i*n + j``. Each item has one owner: with PNG output rank r
of W takes items r, r + W, ...; with shard output it takes whole shards r, r + W, ... (a shard is
one tar written at once, so it has one writer). An item is done when its output exists (files are
written atomically), so a rerun after a crash only makes what is missing, and the final set is the
same as an uninterrupted run's. ``metadata.jsonl`` is rebuilt from the job list at the end, so it
always matches the images on disk.

A rerun never mixes jobs: ``job.json`` in the output folder records what decides the pixels (a
fingerprint of the checkpoint, a digest of the prompts, every sampling setting); a job with other
inputs refuses that folder unless told to delete the old job's files (``overwrite``).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.atomic import atomic_path, temporary_target
from ldm.data.shard_reader import read_shard
from ldm.data.shard_writer import ShardWriter
from ldm.data.shards import expand_shards
from ldm.data.skips import DataCounts
from ldm.errors import UserError
from ldm.jsonl import jsonl_rows, text_lines

MAX_PROMPTS = 1_000_000  # a job of more prompts is split into several jobs (the item list lives in memory)
MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens (~300 characters); a longer prompt is cut here
MAX_PROMPT_LINE_BYTES = 4 * MAX_PROMPT_CHARS  # a .txt line is read up to this, the rest skipped
MAX_JSONL_LINE_BYTES = 64 << 10  # a .jsonl record longer than this is refused (it cannot be cut and parsed)
MANIFEST = "job.json"


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
def read_prompt_records(
    prompt: str | None, prompts_file: str | None, prompts_shards: Any = None
) -> list[dict[str, Any]]:
    """Prompts as records {"prompt": str, ...fields to carry}: one prompt, a text file (a prompt a
    line), a JSONL file (a "prompt" or "caption" field per line; other fields are carried into
    the metadata), or webdataset shards of captions (.txt members; key and .json carried).

    Prompt files are untrusted: UTF-8 only, at most ``MAX_PROMPTS`` prompts and ``MAX_FILE_BYTES``
    read, each prompt cut to ``MAX_PROMPT_CHARS`` (a warning says how many were cut)."""
    given = [x for x in (prompt, prompts_file, prompts_shards) if x is not None]
    if len(given) != 1:
        raise UserError("give exactly one of prompt=..., prompts_file=... or prompts_shards=...")
    if prompt is not None:
        records = [{"prompt": str(prompt)}]
    elif prompts_shards is not None:
        records = _records_from_shards(prompts_shards)
    else:
        path = Path(prompts_file).expanduser()
        if not path.exists():
            raise UserError(f"prompts file not found: {path}")
        if not path.is_file():
            raise UserError(f"prompts file is not a regular file: {path}")
        records = _records_from_jsonl(path) if path.suffix == ".jsonl" else _records_from_text(path)
        if not records:
            raise UserError(f"prompts file is empty: {path}")
    return _cut_long_prompts(records)


def _cut_long_prompts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    long = sum(len(r["prompt"]) > MAX_PROMPT_CHARS for r in records)
    if long:
        print(
            f"warning: {long} prompt(s) longer than {MAX_PROMPT_CHARS} characters were cut "
            "(the text encoder reads 77 tokens anyway)",
            file=sys.stderr,
        )
    return [{**r, "prompt": r["prompt"][:MAX_PROMPT_CHARS]} for r in records]


def _add_record(records: list[dict[str, Any]], record: dict[str, Any], source: Any) -> None:
    if len(records) >= MAX_PROMPTS:
        raise UserError(f"{source}: more than {MAX_PROMPTS:,} prompts: split them into several jobs")
    records.append(record)


def _records_from_text(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for _, line, _ in text_lines(path, MAX_PROMPT_LINE_BYTES, truncate=True):
        if line.strip():
            _add_record(records, {"prompt": line.strip()}, path)
    return records


def _records_from_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for number, row in jsonl_rows(path, MAX_JSONL_LINE_BYTES):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: each line must be a JSON object")
        prompt = row.pop("prompt", None)  # "" is a prompt: the unconditional model (e.g. guided by a classifier)
        text = prompt if isinstance(prompt, str) else row.pop("caption", None)
        if not isinstance(text, str):
            raise UserError(f"{path}:{number}: no 'prompt' or 'caption' string")
        _add_record(records, {"prompt": text, **row}, path)
    return records


def _records_from_shards(spec: Any) -> list[dict[str, Any]]:
    """The ``.txt`` caption of each sample of tar shards (read by ``ldm.data.shard_reader``: member size
    caps, timeouts), in order. A shard that cannot be read whole is an error: the job's prompts would
    depend on where it broke."""
    records: list[dict[str, Any]] = []
    counts = DataCounts()
    for url in expand_shards(spec):
        for sample in read_shard(url, counts):
            if "txt" in sample:
                text = _caption_text(sample["txt"], f"{url}: {sample['__key__']}.txt")
                _add_record(records, {"prompt": text, "key": sample["__key__"], "shard": Path(url).name}, url)
        if counts.take():
            reason, where, detail = counts.last_skip
            raise UserError(
                f"{where or url}: {reason.replace('_', ' ')} ({detail}): the job's prompts would be incomplete"
            )
    return records


def _caption_text(data: bytes, where: str) -> str:
    """A caption's text, its first MAX_PROMPT_LINE_BYTES bytes (a cut that ends inside a character drops it)."""
    try:
        return (
            codecs.getincrementaldecoder("utf-8")()
            .decode(data[:MAX_PROMPT_LINE_BYTES], final=len(data) <= MAX_PROMPT_LINE_BYTES)
            .strip()
        )
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None


def prompts_digest(records: Sequence[dict[str, Any]]) -> str:
    """sha256 of the prompts and their carried fields, in order (what the job's metadata holds)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()


def job_items(records: Sequence[dict[str, Any]], images_per_prompt: int, seed: int) -> list[JobItem]:
    """The whole job, in a fixed order (the same on every rank and every rerun)."""
    items = []
    for i, record in enumerate(records):
        fields = {k: v for k, v in record.items() if k != "prompt"}
        for j in range(images_per_prompt):
            index = i * images_per_prompt + j
            items.append(JobItem(index, record["prompt"], seed + index, fields))
    return items


def metadata_row(item: JobItem, settings: dict[str, Any], file: str | None = None) -> dict[str, Any]:
    """The metadata of one image: the generated fields (file, index, prompt, seed and the job's
    settings) and the record's own fields. A carried field named like a generated one (a JSONL
    prompt with its own "seed", "index" or "file") cannot replace it: it is kept under "carried"."""
    generated = {
        **({"file": file} if file is not None else {}),
        "index": item.index,
        "prompt": item.prompt,
        "seed": item.seed,
        **settings,
    }
    reserved = {*generated, "file", "carried"}
    row = {**generated, **{k: v for k, v in item.fields.items() if k not in reserved}}
    clashing = {k: v for k, v in item.fields.items() if k in reserved}
    if clashing:
        row["carried"] = clashing
    return row


# ---------------------------------------------------------------- outputs
class FolderOutput:
    """One PNG per item (``000123.png``), written atomically; ``metadata.jsonl`` at the end."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def owner_key(self, item: JobItem) -> int:
        """Items are dealt round-robin: any rank may write any PNG."""
        return item.index

    def done(self, item: JobItem) -> bool:
        return (self.directory / f"{item.name}.png").is_file()

    def files_of(self, mine: Sequence[JobItem], items: Sequence[JobItem]) -> set[str]:
        """Names of the files that only this rank writes."""
        return {f"{item.name}.png" for item in mine}

    def write(self, item: JobItem, image: np.ndarray) -> None:
        with atomic_path(self.directory / f"{item.name}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")

    def finalize(self, items: Sequence[JobItem], row: Callable[[JobItem, str], dict[str, Any]]) -> int:
        """Write ``metadata.jsonl`` for the PNGs on disk; returns how many there are."""
        present = [item for item in items if self.done(item)]
        with atomic_path(self.directory / "metadata.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(row(i, f"{i.name}.png")) + "\n" for i in present))
        return len(present)


class ShardOutput:
    """webdataset shards of ``samples_per_shard`` items (``.png`` + ``.json``); a shard is written
    atomically once all its items are made, so a shard either exists whole or not at all. A shard's
    items all belong to one rank (``owner_key``): a tar has one writer, whatever the world size."""

    def __init__(self, directory: str | Path, samples_per_shard: int, row: Callable[[JobItem], dict[str, Any]]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.row = row
        self.pending: dict[int, dict[int, tuple[JobItem, np.ndarray]]] = {}

    def shard_of(self, item: JobItem) -> int:
        return item.index // self.samples_per_shard

    def owner_key(self, item: JobItem) -> int:
        """Shards are dealt round-robin: rank r of W writes shards r, r + W, ..."""
        return self.shard_of(item)

    def path(self, shard: int) -> Path:
        return self.directory / f"samples-{shard:06d}.tar"

    def done(self, item: JobItem) -> bool:
        return self.path(self.shard_of(item)).is_file()

    def files_of(self, mine: Sequence[JobItem], items: Sequence[JobItem]) -> set[str]:
        """Names of this rank's shards (it owns every item of each, so only it writes them)."""
        return {self.path(self.shard_of(item)).name for item in mine}

    def write(self, item: JobItem, image: np.ndarray, shard_items: Sequence[JobItem]) -> None:
        shard = self.shard_of(item)
        self.pending.setdefault(shard, {})[item.index] = (item, image)
        if len(self.pending[shard]) == len(shard_items):
            self._write_shard(shard, [self.pending[shard][i.index] for i in shard_items])
            del self.pending[shard]

    def _write_shard(self, shard: int, entries: list[tuple[JobItem, np.ndarray]]) -> None:
        writer = ShardWriter(self.path(shard))  # published whole, or deleted
        try:
            for item, image in entries:
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                writer.write({"__key__": item.name, "png": png.getvalue(), "json": json.dumps(self.row(item))})
            writer.close()
        except BaseException:
            writer.abort()
            raise

    def finalize(self, items: Sequence[JobItem], row: Callable[[JobItem, str], dict[str, Any]]) -> int:
        return sum(1 for item in items if self.done(item))


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

    def mine(self, items: Sequence[JobItem], owner_key: Callable[[JobItem], int] | None = None) -> list[JobItem]:
        """This rank's items: those whose owner key (default: the index) is ``rank`` modulo W."""
        if owner_key is None:
            return list(items[self.rank :: self.world_size])
        return [item for item in items if owner_key(item) % self.world_size == self.rank]


def init_process_group(ranks: Ranks, device: torch.device) -> bool:
    """A process group for the out_dir verdict, the final barrier and counts, when there are several ranks."""
    import torch.distributed as dist

    if ranks.world_size == 1 or dist.is_initialized():
        return dist.is_initialized()
    if "MASTER_ADDR" not in os.environ:
        raise UserError("several ranks but no MASTER_ADDR: launch with torchrun or srun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # collectives (the out_dir verdict, the counts) use this rank's GPU
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
        if temporary_target(name) in names:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def run_job(
    items: Sequence[JobItem],
    generate: Callable[[list[JobItem]], torch.Tensor],
    output: FolderOutput | ShardOutput,
    ranks: Ranks,
    batch_size: int,
) -> dict[str, Any]:
    """Make this rank's missing items in batches; returns counts (made, skipped, failed, seconds).
    ``generate(batch)`` makes the images (B, 3, H, W) in [0, 1] of a batch of items (prompt, seed, ...).

    An image with a non-finite pixel (NaN/Inf, e.g. an fp16 overflow) is not written: a warning
    names the item, it counts as failed, and a rerun makes it again (it is still missing)."""
    mine = ranks.mine(items, output.owner_key)
    remove_stale_temporaries(output.directory, output.files_of(mine, items))
    todo = [item for item in mine if not output.done(item)]  # in index order: shards complete one by one
    by_shard: dict[int, list[JobItem]] = {}
    if isinstance(output, ShardOutput):
        for item in mine:
            by_shard.setdefault(output.shard_of(item), []).append(item)
    start = time.perf_counter()
    made = failed = 0
    with tqdm(total=len(todo), desc=f"sampling (rank {ranks.rank})", unit="img", disable=ranks.rank != 0) as bar:
        for batch in batches_of(todo, batch_size):
            pixels = generate(batch)  # (B, 3, H, W)
            finite = torch.isfinite(pixels.flatten(1)).all(dim=1).tolist()
            for item, image, ok in zip(batch, _to_uint8(pixels), finite):
                if not ok:
                    failed += 1
                    print(
                        f"error: item {item.index} (seed {item.seed}, prompt {item.prompt[:60]!r}): non-finite "
                        "pixels (NaN/Inf), not written",
                        file=sys.stderr,
                    )
                elif isinstance(output, ShardOutput):
                    output.write(item, image, by_shard[output.shard_of(item)])
                    made += 1
                else:
                    output.write(item, image)
                    made += 1
            bar.update(len(batch))
    return {"made": made, "skipped": len(mine) - len(todo), "failed": failed, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- the job manifest
FINGERPRINT_WHOLE_BYTES = 16 << 20  # files up to this size are hashed whole
FINGERPRINT_END_BYTES = 1 << 20  # of larger ones: the first and last MiB ...
FINGERPRINT_SAMPLES = 16  # ... and this many 64 KiB blocks spread evenly between them
FINGERPRINT_SAMPLE_BYTES = 64 << 10
FINGERPRINT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".json", ".txt", ".model")


def checkpoint_fingerprint(path: str | Path) -> str:
    """A content fingerprint of a model file or diffusers folder, cheap at any size (milliseconds
    for a 7 GB file), independent of its path and mtime (a copy on another node is the same model).

    Per file: its size, then sha256 of the whole file up to 16 MiB; above that, of the first and
    last MiB and 16 blocks of 64 KiB spread between them. A torch zip checkpoint ends with the
    CRC-32 of every member, and a safetensors file starts with its header: a change of the
    weights that leaves every sampled byte equal goes unseen (rewrite a checkpoint in place only
    with a new out_dir). A folder: its weight, config and tokenizer files up to two levels deep,
    with their relative names."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file_sample(digest, path)
    elif path.is_dir():
        files = sorted(
            p
            for pattern in ("*", "*/*")
            for p in path.glob(pattern)
            if p.suffix in FINGERPRINT_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
        for file in files:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _hash_file_sample(digest, file)
    else:
        raise UserError(f"checkpoint not found: {path}")
    return digest.hexdigest()


def _hash_file_sample(digest: Any, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\0".encode())
    with open(path, "rb") as file:
        if size <= FINGERPRINT_WHOLE_BYTES:
            digest.update(file.read())
            return
        spans = [(0, FINGERPRINT_END_BYTES), (size - FINGERPRINT_END_BYTES, FINGERPRINT_END_BYTES)]
        step = (size - 2 * FINGERPRINT_END_BYTES) // (FINGERPRINT_SAMPLES + 1)
        spans[1:1] = [
            (FINGERPRINT_END_BYTES + k * step, FINGERPRINT_SAMPLE_BYTES) for k in range(1, FINGERPRINT_SAMPLES + 1)
        ]
        for offset, length in spans:
            file.seek(offset)
            digest.update(file.read(length))


def job_manifest(
    checkpoint: str | Path,
    records: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    loras: Sequence[tuple[str | Path, float]] = (),
) -> dict[str, Any]:
    """What decides the job's outputs: the model (by content), the LoRAs merged into it (by content,
    with their scales, in order), the prompts, and every setting that changes pixels or metadata, as
    plain JSON (tuples become lists, as when read back from disk). ``checkpoint_path`` and
    ``lora_paths`` are recorded for people, never compared."""
    manifest = {
        "checkpoint": checkpoint_fingerprint(checkpoint),
        "prompts": prompts_digest(records),
        "num_prompts": len(records),
        "settings": settings,
        "checkpoint_path": str(checkpoint),
    }
    if loras:  # (absent without LoRAs: job.json files written before LoRAs existed still match)
        manifest["loras"] = [[checkpoint_fingerprint(path), float(scale)] for path, scale in loras]
        manifest["lora_paths"] = [str(path) for path, _ in loras]
    return json.loads(json.dumps(manifest, default=str))


_JOB_FILE = re.compile(r"(\d{6,}\.png|samples-\d{6,}\.tar|metadata\.jsonl|grid\.png|job\.json)")


def job_files(directory: Path) -> list[Path]:
    """The files a sampling job writes in ``directory`` (and temporaries of them); nothing else."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        name = temporary_target(path.name) or path.name
        if _JOB_FILE.fullmatch(name) and (path.is_file() or path.is_symlink()):
            found.append(path)
    return found


def claim_out_dir(directory: Path, manifest: dict[str, Any], overwrite: bool = False) -> None:
    """Make ``directory`` this job's: a new or identical job goes ahead (and resumes); a folder that
    holds another job's outputs is refused, or with ``overwrite`` those files (only files a
    sampling job writes, see ``job_files``) are deleted first. Writes ``job.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(directory / MANIFEST)
    leftovers = job_files(directory)
    if previous is not None and not _differences(previous, manifest):
        return
    samples = [path for path in leftovers if path.name != MANIFEST]
    if samples and not overwrite:  # (a job.json alone: that job made nothing yet, replace it)
        what = (
            "of a job without job.json"
            if previous is None
            else "of another job (" + ", ".join(_differences(previous, manifest)) + ")"
        )
        raise UserError(
            f"{directory} holds samples {what}: use another out_dir, or overwrite=true to delete "
            f"its {len(samples)} sample file(s) first"
        )
    for path in leftovers:
        path.unlink(missing_ok=True)
    with atomic_path(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def claim_out_dir_on_rank_zero(
    directory: Path, make_manifest: Callable[[], dict[str, Any]], overwrite: bool, ranks: Ranks, device: torch.device
) -> None:
    """``claim_out_dir`` by rank 0 alone (one writer, no race on the deletions); the other ranks
    wait for its verdict and raise the same one-line error, so no rank hangs or writes first."""
    import torch.distributed as dist

    failure: BaseException | None = None
    verdict: list[str | None] = [None]
    if ranks.rank == 0:
        try:
            claim_out_dir(directory, make_manifest(), overwrite)
        except Exception as error:  # noqa: BLE001 - told to every rank, then raised as it was
            failure, verdict[0] = (
                error,
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
            )
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0, device=device if device.type == "cuda" else None)
    if failure is not None:
        raise failure
    if verdict[0] is not None:
        raise UserError(f"rank 0: {verdict[0]}")


def check_positive(**values: Any) -> None:
    """One line for a count that must be a positive integer (``steps=0``, ``batch_size=-1``)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as file:
            value = json.loads(file.read(MAX_JSONL_LINE_BYTES * 16))
    except (ValueError, RecursionError):
        value = None
    return value if isinstance(value, dict) else {}  # unreadable: a job that differs in everything


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of what differs, for the one-line refusal: "steps 20 -> 3", "checkpoint", "prompts"."""
    names = [key for key in ("checkpoint", "loras", "prompts") if old.get(key) != new.get(key)]
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    for key, value in new["settings"].items():
        if key not in old_settings:
            names.append(key)
        elif old_settings[key] != value:
            short = all(
                isinstance(v, (int, float, bool, type(None))) or (isinstance(v, str) and len(v) <= 40)
                for v in (old_settings[key], value)
            )
            names.append(f"{key} {old_settings[key]} -> {value}" if short else key)
    names.extend(key for key in old_settings if key not in new["settings"])
    return names


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
