"""Streams of batches from shards, per rank and loader worker: resampled, mixed and resumable for
training, split disjointly for validation. One stream for every kind of shard: what a sample
becomes is the decoder's business (``to_sample``: images, ``ldm.data.samples``; precomputed latents,
``ldm.data.latent_samples``).

Training: each source's shards are drawn with replacement from a seed derived from (seed, rank,
worker, epoch), sources are mixed by weight, samples pass a shuffle buffer, then decode and batch
(``ldm.data.worker_stream``). Every rank and worker draws a different stream, the same seed gives
the same streams, and no rank ever runs out of data: with ``samples_per_epoch`` each worker yields
exactly ceil(samples_per_epoch / (world_size x workers x batch_size)) batches per epoch, so all
ranks run the same number of steps whatever the shard sizes. Each sample is decoded with a
generator seeded by its place in the stream, and each batch carries its worker's position after it
(``POSITION_KEY``, taken off by ``ldm.data.training_loader.TrainingLoader``), from which the stream is
re-created without decoding anything it had already read.

Validation: shards are split across ranks, then across each rank's workers, each read once, in
order; with fewer shards than ranks, every rank reads every shard and keeps every world_size-th
sample of each, so that ranks still see disjoint samples and none is left without data. A worker
with no shard yields nothing (no error, no hang).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.samples import collate
from ldm.data.seeds import PROCESS, VALIDATION, stream_seed
from ldm.data.shard_reader import DEFAULT_MAX_MEMBER_BYTES, read_samples_at, read_shard
from ldm.data.shards import Source
from ldm.data.skips import COUNTS_KEY, ERROR, DataCounts, FilteredOut, SkipSample, log
from ldm.data.worker_stream import RawSample, Tag, WorkerStream

# this many unexpected errors in a row are a bug, not bad data: raise the last one
MAX_CONSECUTIVE_ERRORS = 100
# the batch key of a training batch's ``WorkerPosition`` (removed before the batch reaches the model)
POSITION_KEY = "__position__"
# the sample fields a batch is grouped by the shape of (one aspect bucket per batch)
SHAPE_FIELDS = ("image", "latent")


class SkipShard(Exception):
    """Raised by a decoder's ``check_header`` for a shard whose samples must all be dropped."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def worker_position(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) of the calling process. ``rank``/``world_size`` as
    given (the DataModule passes the trainer's), else from the environment or torch.distributed."""
    if rank is None or world_size is None:
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world_size, worker, num_workers


@dataclass(frozen=True)
class StreamStart:
    """Where an iteration of the training stream starts (set by ``TrainingLoader`` before each one).

    epoch: seeds the epoch's streams; done: batches of the epoch this rank already trained on;
    worker_states: per logical worker, the ``WorkerPosition.state`` it reached (None: from the
    epoch's start, or a stream without state such as the folder's plan).
    """

    epoch: int = 0
    done: int = 0
    worker_states: Sequence[dict[str, Any] | None] | None = None


class WorkerPosition:
    """A training batch's provenance: the logical worker that made it, how many batches of the epoch
    it had made with it, and its stream's state after it (plain data). Opaque to collate and pin_memory."""

    __slots__ = ("worker", "batches", "state")

    def __init__(self, worker: int, batches: int, state: dict[str, Any]):
        self.worker, self.batches, self.state = worker, batches, state


def logical_worker(worker: int, num_workers: int, done: int) -> int:
    """The stream a loader worker continues: a fresh loader takes its first batch from worker 0,
    and the batch after ``done`` comes from stream ``done % num_workers``, so the uninterrupted
    order of batches goes on however the iteration was cut."""
    return (worker + done) % num_workers


def batches_of_worker(worker: int, num_workers: int, count: int) -> int:
    """How many of an epoch's first ``count`` batches come from logical worker ``worker``."""
    return len(range(worker, count, num_workers))


class ShardStream(IterableDataset):
    """Batches from shard sources (see the module docstring): {"image"/"latent", ..., "key",
    "skipped"} as the decoder's samples hold them.

    sources: training: one or more ``Source`` (urls, weight), mixed by weight; validation: exactly one.
    to_sample: raw sample, rng -> sample, raising ``SkipSample``/``FilteredOut`` to drop it. It may
        have ``bind(split, rank, worker, counts)`` (called in the decoding process) and
        ``check_header(url, raw)``: then every shard opens with a header sample (not a training
        sample), handed to it, which raises ``SkipShard`` for a shard to drop whole.
    batch_size: samples per batch; validation keeps the last partial batch, training drops it.
    seed: base seed; training streams are a function of (seed, rank, worker, epoch) only.
    shuffle_buffer: raw samples held for shuffling (training; <= 1: off).
    samples_per_epoch: training epoch length summed over all ranks and workers (None: endless).
    rank / world_size: this process's place in the job (None: from the environment).
    read_timeout: seconds a pipe/remote shard may stall before it is abandoned.

    ``batch["skipped"]`` holds the skip/filter counts of this worker since its previous batch. In
    validation a batch is handed out only once the next sample (or the end of the stream) is
    reached, so the counts of a finite stream arrive in full with its last batch.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        to_sample: Callable[[dict[str, Any], random.Random], dict[str, Any]],
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        read_timeout: float | None = 300.0,
        max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__()
        if not sources or any(not source.urls for source in sources):
            raise ValueError("every source needs at least one shard")
        if not train and len(sources) != 1:
            raise ValueError("validation reads exactly one source")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive or None, not {samples_per_epoch}")
        self.sources = list(sources)
        self.to_sample = to_sample
        self.batch_size = batch_size
        self.train = train
        self.seed = seed if seed is not None else 0
        self.start = StreamStart()
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.read_timeout = read_timeout
        self.max_member_bytes = max_member_bytes
        self.counts = DataCounts()  # one per process: each loader worker has its own copy
        self._errors = 0  # unexpected decoding errors in a row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size, worker, num_workers = worker_position(self.rank, self.world_size)
        if self.train:
            return self._training_batches(
                rank, world_size, logical_worker(worker, num_workers, self.start.done), num_workers
            )
        self._bind("val", rank, worker)
        raw = self._validation_samples(rank, world_size, worker, num_workers)
        rng = random.Random(stream_seed(self.seed, VALIDATION, rank, worker))  # same every time
        decoded = (sample for sample in (self._decode(raw_sample, rng) for raw_sample in raw) if sample is not None)
        return batches_by_shape(decoded, self.batch_size, True, self._collate)

    def batches_per_worker(self, world_size: int, num_workers: int) -> int | None:
        """Training batches each worker yields per epoch (webdataset's ``with_epoch``), or None."""
        if not self.samples_per_epoch:
            return None
        return math.ceil(self.samples_per_epoch / (world_size * num_workers * self.batch_size))

    # ------------------------------------------------------------------ training
    def _training_batches(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches of logical worker ``worker`` from ``self.start`` on, each with its position."""
        start = self.start
        self._bind("train", rank, worker)
        seed = partial(stream_seed, self.seed, rank, worker, start.epoch)
        stream = WorkerStream(
            self.sources, seed, self._open, self.shuffle_buffer, lambda: self.counts.last_skip, self._read_at
        )
        made = batches_of_worker(worker, num_workers, start.done)  # this epoch's batches it made already
        state = start.worker_states[worker] if start.worker_states else None
        pending: dict[tuple[int, ...], list[tuple[Tag, int, dict[str, Any]]]] = {}
        if state is not None:
            pending = self._restore(stream, state, seed)
        per_worker = self.batches_per_worker(world_size, num_workers)
        while per_worker is None or made < per_worker:
            try:
                index, tag, raw = stream.next()
            except StopIteration:
                return
            sample = self._decode(raw, random.Random(seed(PROCESS, index)))
            if sample is None:
                continue
            current = pending.setdefault(sample_shape(sample), [])
            current.append((tag, index, sample))
            if len(current) < self.batch_size:
                continue
            del pending[sample_shape(sample)]
            made += 1
            batch = self._collate([s for _, _, s in current])
            # kept back: samples of other shapes waiting for a batch, re-read and re-decoded on restore
            waiting = sorted(
                ((tag, index) for group in pending.values() for tag, index, _ in group), key=lambda p: p[1]
            )
            batch[POSITION_KEY] = WorkerPosition(
                worker,
                made,
                {
                    "stream": stream.state([tag for tag, _ in waiting]),
                    "pending": [[*tag, index] for tag, index in waiting],  # [source, draw, member, offset, index]
                    "errors": self._errors,
                    "batches": made,
                },
            )
            yield batch

    def _restore(
        self, stream: WorkerStream, state: dict[str, Any], seed: Callable[..., int]
    ) -> dict[tuple[int, ...], list[tuple[Tag, int, dict[str, Any]]]]:
        """Put ``stream`` where ``state`` says and re-decode the samples that were waiting for a batch
        of their shape; a shard that no longer reads costs exactness, never the run (one warning)."""
        problems = stream.restore(state["stream"])
        self._errors = int(state.get("errors", 0))
        waiting = [(tuple(int(x) for x in entry[:4]), int(entry[4])) for entry in state.get("pending", [])]
        found, more = stream.fetch([tag for tag, _ in waiting], state["stream"]["shard_urls"])
        pending: dict[tuple[int, ...], list[tuple[Tag, int, dict[str, Any]]]] = {}
        for tag, index in waiting:
            sample = self._decode(found[tag], random.Random(seed(PROCESS, index))) if tag in found else None
            if sample is not None:
                pending.setdefault(sample_shape(sample), []).append((tag, index, sample))
        if problems or more:
            log.warning(
                "data: resuming: could not read again %s; the stream goes on without them (not bit-identical)",
                "; ".join(problems + more),
            )
        return pending

    # ------------------------------------------------------------------ reading
    def _open(self, url: str, start: int = 0, offset: int = -1) -> Iterator[RawSample]:
        """The samples of shard ``url`` from sample ``start`` on, which begins at byte ``offset``
        (-1: unknown, the samples before it are passed over). A header sample, where the decoder wants
        one, is checked when reading from the start and never counted as a sample."""
        check_header = getattr(self.to_sample, "check_header", None)
        if offset >= 0 and start > 0:
            return read_shard(url, self.counts, self.read_timeout, self.max_member_bytes, offset=offset)
        skip = start + (1 if check_header is not None and start > 0 else 0)
        samples = read_shard(url, self.counts, self.read_timeout, self.max_member_bytes, skip=skip)
        if check_header is None or start > 0:
            return samples
        return self._checked(url, samples, check_header)

    def _read_at(self, url: str, offsets: Sequence[int]) -> dict[int, RawSample]:
        return read_samples_at(url, offsets, self.read_timeout, self.max_member_bytes)

    def _checked(
        self, url: str, samples: Iterator[RawSample], check_header: Callable[[str, RawSample], None]
    ) -> Iterator[RawSample]:
        try:
            first = next(samples, None)
            if first is None:
                return
            try:
                check_header(url, first)
            except SkipShard as skip:
                self.counts.skip(skip.reason, url, skip.detail)
                return
            yield from samples
        finally:
            samples.close()

    def _validation_samples(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[RawSample]:
        urls = self.sources[0].urls
        split_samples = len(urls) < world_size  # too few shards to give every rank one
        rank_urls = urls if split_samples else urls[rank::world_size]
        for url in rank_urls[worker::num_workers]:
            samples = self._open(url)
            if split_samples:
                samples = itertools.islice(samples, rank, None, world_size)
            yield from samples

    # ------------------------------------------------------------------ decoding and batching
    def _bind(self, split: str, rank: int, worker: int) -> None:
        if hasattr(self.to_sample, "bind"):  # its counts, and the quarantine's in-flight record (ldm.data.samples)
            self.to_sample.bind(split, rank, worker, self.counts)

    def _decode(self, raw: RawSample, rng: random.Random) -> dict[str, Any] | None:
        """The decoded sample, or None for one dropped (counted under its reason)."""
        where = f"{raw.get('__url__')}:{raw.get('__key__')}"
        try:
            decoded = self.to_sample(raw, rng)
        except SkipSample as skip:
            self.counts.skip(skip.reason, where, skip.detail)
            return None
        except FilteredOut as rejected:
            self.counts.filtered(rejected.name)
            return None
        except Exception as error:  # noqa: BLE001 - one odd sample must not end a run...
            self._errors += 1
            if self._errors >= MAX_CONSECUTIVE_ERRORS:
                raise  # ...but a hundred in a row are a bug
            self.counts.skip(ERROR, where, f"{type(error).__name__}: {error}")
            return None
        self._errors = 0
        return decoded

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples)
        batch[COUNTS_KEY] = self.counts.take()
        return batch


def sample_shape(sample: dict[str, Any]) -> tuple[int, ...]:
    """The shape a sample is batched by: its image's (or latent's)."""
    for field in SHAPE_FIELDS:
        value = sample.get(field)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return ()


def batches_by_shape(
    samples: Iterable[dict[str, Any]],
    batch_size: int,
    keep_partial: bool,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """Batches of ``batch_size`` samples of one shape (one aspect bucket; a single shape without
    buckets), one pending batch per shape. A full batch is handed out only when the next sample
    arrives (or the stream ends), so the skip counts gathered meanwhile travel with it;
    ``keep_partial`` (validation) also hands out each shape's last partial batch, in the order the
    shapes first appeared; without it they are dropped."""
    ready: list[dict[str, Any]] | None = None  # a full batch, handed out when the next sample comes
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for sample in samples:
        if ready is not None:
            yield collate_fn(ready)
            ready = None
        shape = sample_shape(sample)
        current = pending.setdefault(shape, [])
        current.append(sample)
        if len(current) == batch_size:
            ready = current
            del pending[shape]
    partial_batches = [current for current in pending.values() if current] if keep_partial else []
    for batch in ([ready] if ready is not None else []) + partial_batches:
        yield collate_fn(batch)
