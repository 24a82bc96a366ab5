"""Streams of batches from shards, per rank and loader worker: resampled and mixed for training,
split disjointly for validation.

Training: each source's shards are drawn with replacement (``wds.ResampledShards``) from a seed
derived from (seed, start step, rank, worker, epoch), sources are mixed by weight, samples pass a
shuffle buffer, then decode and batch. Every rank and worker draws a different stream, the same
seed gives the same streams, and no rank ever runs out of data: with ``samples_per_epoch`` each
worker yields exactly ceil(samples_per_epoch / (world_size x workers x batch_size)) batches per
epoch (webdataset's ``with_epoch``), so all ranks run the same number of steps whatever the shard sizes.

Validation: shards are split across ranks, then across each rank's workers (webdataset's
``split_by_node`` and ``split_by_worker``), each read once, in order; with fewer shards than
ranks, every rank reads every shard and keeps every world_size-th sample of each, so that ranks
still see disjoint samples and none is left without data. A worker with no shard yields nothing
(no error, no hang).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.samples import collate
from ldm.data.shard_reader import DEFAULT_MAX_MEMBER_BYTES, read_shard
from ldm.data.shards import Source
from ldm.data.skips import COUNTS_KEY, ERROR, DataCounts, FilteredOut, SkipSample
from ldm.errors import UserError

# a training source whose first this-many shard draws all fail is misconfigured: raise
MAX_FAILED_SHARDS = 16
# this many unexpected errors in a row are a bug, not bad data: raise the last one
MAX_CONSECUTIVE_ERRORS = 100
# streams of the per-worker seed
SHARDS, SHUFFLE, PROCESS, VALIDATION, MIX = 0, 1, 2, 3, 4
# samples in the shuffle buffer before it starts yielding (it then grows to its full size)
SHUFFLE_INITIAL = 100


class NoReadableShard(UserError):
    """Not one shard of a training source could be read (credentials, paths, a missing tool)."""


def stream_seed(*parts: int) -> int:
    """One 32-bit seed from any number of non-negative integers (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1)[0])


def worker_position(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) of the calling process. ``rank``/``world_size`` as
    given (the DataModule passes the trainer's), else from the environment or torch.distributed."""
    if rank is None or world_size is None:
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world_size, worker, num_workers


class ImageCaptionStream(IterableDataset):
    """Batches {"image", "caption", "key", "skipped"} from shard sources (see the module docstring).

    sources: training: one or more ``Source`` (urls, weight), mixed by weight; validation: exactly one.
    to_sample: raw sample, rng -> training sample, raising ``SkipSample``/``FilteredOut`` to drop it.
    batch_size: samples per batch; validation keeps the last partial batch, training drops it.
    seed: base seed. Training streams are a function of (seed, rank, worker, epoch) only, so a
        resumed run reads exactly what the interrupted one would have read next: ``TrainingLoader``
        sets ``epoch`` and ``skip_batches`` (batches of that epoch this rank already trained on)
        before each iteration, and each worker drops its share of them.
    shuffle_buffer: raw samples held for shuffling (training; <= 1: off).
    samples_per_epoch: training epoch length summed over all ranks and workers (None: endless).
    rank / world_size: this process's place in the job (None: from the environment).
    read_timeout: seconds a pipe/remote shard may stall before it is abandoned.

    ``batch["skipped"]`` holds the skip/filter counts of this worker since its previous batch; a
    batch is handed out only once the next sample (or the end of the stream) is reached, so the
    counts of a finite stream arrive in full with its last batch.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        to_sample: Callable[[dict[str, Any], random.Random], dict[str, Any]],
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
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
        self.epoch = epoch
        self.skip_batches = skip_batches
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.read_timeout = read_timeout
        self.max_member_bytes = max_member_bytes
        self.counts = DataCounts()  # one per process: each loader worker has its own copy

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size, worker, num_workers = worker_position(self.rank, self.world_size)
        if hasattr(self.to_sample, "bind"):  # its counts, and the quarantine's in-flight record (ldm.data.samples)
            self.to_sample.bind("train" if self.train else "val", rank, worker, self.counts)
        skip = 0
        if self.train:
            seed = partial(stream_seed, self.seed, rank, worker, self.epoch)
            raw = self._training_samples(seed)
            rng = random.Random(seed(PROCESS))
            # resuming: this worker's batches among the first skip_batches. The loader takes
            # batches from its workers in turn, always starting with worker 0, so whole rounds are
            # skipped here and ``TrainingLoader`` drops the rest.
            whole_rounds = self.skip_batches - self.skip_batches % num_workers
            skip = len(range(worker, whole_rounds, num_workers))
        else:
            raw = self._validation_samples(rank, world_size, worker, num_workers)
            rng = random.Random(stream_seed(self.seed, VALIDATION, rank, worker))  # same every time
        batches = self._batches(self._decoded(raw, rng), keep_partial=not self.train)
        end = None
        if self.train and self.samples_per_epoch:
            end = math.ceil(self.samples_per_epoch / (world_size * num_workers * self.batch_size))  # wds with_epoch
        return itertools.islice(batches, skip, end) if skip or end else batches

    # ------------------------------------------------------------------ sources of raw samples
    def _training_samples(self, seed: Callable[..., int]) -> Iterator[dict[str, Any]]:
        streams = []
        for index, source in enumerate(self.sources):
            source_seed = seed(SHARDS, index)
            shards = wds.ResampledShards(source.urls, worker_seed=lambda s=source_seed: s, deterministic=True)
            streams.append(self._read_resampled(shards, source))
        weights = [source.weight for source in self.sources]
        mixed = streams[0] if len(streams) == 1 else _mix(streams, weights, seed(MIX))
        if self.shuffle_buffer > 1:
            initial = min(SHUFFLE_INITIAL, self.shuffle_buffer)
            mixed = wds.shuffle(self.shuffle_buffer, initial, rng=random.Random(seed(SHUFFLE)))(mixed)
        return mixed

    def _read_resampled(self, shards: Iterable[dict[str, str]], source: Source) -> Iterator[dict[str, Any]]:
        """Samples of an endless draw of shards; fails loudly if no shard can ever be read, and
        backs off (rather than spinning) when many draws in a row fail after some worked."""
        failures, ever_read = 0, False
        for shard in shards:
            read = False
            for sample in read_shard(shard["url"], self.counts, self.read_timeout, self.max_member_bytes):
                read = True
                yield sample
            if read:
                failures, ever_read = 0, True
                continue
            failures += 1
            if failures >= MAX_FAILED_SHARDS:
                reason, where, detail = self.counts.last_skip
                if not ever_read:
                    raise NoReadableShard(
                        f"none of {failures} shards drawn from {source.describe()} could be read; "
                        f"last: {where}: {reason} {detail}"
                    )
                time.sleep(min(60.0, 2.0 ** (failures - MAX_FAILED_SHARDS)))

    def _validation_samples(
        self, rank: int, world_size: int, worker: int, num_workers: int
    ) -> Iterator[dict[str, Any]]:
        urls = self.sources[0].urls
        split_samples = len(urls) < world_size  # too few shards to give every rank one
        rank_urls = urls if split_samples else urls[rank::world_size]
        for url in rank_urls[worker::num_workers]:
            samples = read_shard(url, self.counts, self.read_timeout, self.max_member_bytes)
            if split_samples:
                samples = itertools.islice(samples, rank, None, world_size)
            yield from samples

    # ------------------------------------------------------------------ decoding and batching
    def _decoded(self, raw: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        errors = 0
        for sample in raw:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            try:
                decoded = self.to_sample(sample, rng)
            except SkipSample as skip:
                self.counts.skip(skip.reason, where, skip.detail)
                continue
            except FilteredOut as rejected:
                self.counts.filtered(rejected.name)
                continue
            except Exception as error:  # noqa: BLE001 - one odd sample must not end a run...
                errors += 1
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    raise  # ...but a hundred in a row are a bug
                self.counts.skip(ERROR, where, f"{type(error).__name__}: {error}")
                continue
            errors = 0
            yield decoded

    def _batches(self, samples: Iterator[dict[str, Any]], keep_partial: bool) -> Iterator[dict[str, Any]]:
        return batches_by_shape(samples, self.batch_size, keep_partial, self._collate)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples)
        batch[COUNTS_KEY] = self.counts.take()
        return batch


def batches_by_shape(
    samples: Iterable[dict[str, Any]],
    batch_size: int,
    keep_partial: bool,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """Batches of ``batch_size`` samples of one image shape (one aspect bucket; a single shape without
    buckets), one pending batch per shape. A full batch is handed out only when the next sample
    arrives (or the stream ends), so the skip counts gathered meanwhile travel with it;
    ``keep_partial`` (validation) also hands out each shape's last partial batch, in the order the
    shapes first appeared; training drops them (the stream is cut at a fixed batch count anyway)."""
    ready: list[dict[str, Any]] | None = None  # a full batch, handed out when the next sample comes
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for sample in samples:
        if ready is not None:
            yield collate_fn(ready)
            ready = None
        shape = tuple(sample["image"].shape)
        current = pending.setdefault(shape, [])
        current.append(sample)
        if len(current) == batch_size:
            ready = current
            del pending[shape]
    partial = [current for current in pending.values() if current] if keep_partial else []
    for batch in ([ready] if ready is not None else []) + partial:
        yield collate_fn(batch)


def _mix(streams: list[Iterator[Any]], weights: Sequence[float], seed: int) -> Iterator[Any]:
    """Interleave ``streams``, drawing each item from stream i with probability weights[i] / sum
    (webdataset's ``RandomMix``, with a seeded generator instead of the global one)."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(weights))
    while True:
        index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        try:
            yield next(streams[min(index, len(streams) - 1)])
        except StopIteration:
            return



class TrainingLoader:
    """The training loader: every ``iter()`` (each epoch, and Lightning's extra ones on a restart)
    starts the stream at the trainer's current position, from ``position() -> (epoch, batches of
    that epoch already trained)``, with fresh workers that get the new position."""

    def __init__(
        self,
        stream: ImageCaptionStream,
        make_loader: Callable[[ImageCaptionStream], Iterable[Any]],
        num_workers: int,
        position: Callable[[], tuple[int, int]],
    ):
        self.stream = stream
        self.make_loader = make_loader
        self.num_workers = max(num_workers, 1)
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        epoch, done = self.position()
        self.stream.epoch, self.stream.skip_batches = epoch, done
        batches = iter(self.make_loader(self.stream))
        partial_round = done % self.num_workers
        return itertools.islice(batches, partial_round, None) if partial_round else batches
