"""What every streaming DataModule shares: sources, loaders, and the data position in checkpoints.

Subclasses say what a sample becomes (``train_sample`` / ``val_sample``: images in
``ldm.data.webdataset``, precomputed latents in ``ldm.data.latents``) and may replace the streams
(``ldm.data.folder_datamodule``). The rest is here:

- the position: (epoch, batches of it trained), counted from the optimiser steps, from an epoch base
  that a checkpoint carries forward;
- ``state_dict()``: every rank's ``TrainingLoader.position_state()`` (gathered: Lightning saves rank
  0's checkpoint only) and the shape of the run that made them;
- ``load_state_dict()`` + the first ``train_dataloader()``: the same shape (ranks, workers, batch
  size, accumulation, epoch length, seed, data) continues every worker exactly where it was;
  another shape cannot, and starts a new epoch at the resumed step, seeded as epochs are, said in one
  warning. Epoch numbers only grow, so no stream of the run is ever drawn twice.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.data.shard_reader import DEFAULT_MAX_MEMBER_BYTES
from ldm.data.shards import ShardSpec, ShardSpecError, Source, expand_shards, resolve_sources
from ldm.data.streams import ShardStream
from ldm.data.training_loader import TrainingLoader, WorkerStates
from ldm.errors import UserError

POSITION_FORMAT = "ldm.data_position/1"


def _gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a collective where torch.distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _warn(message: str) -> None:
    """One line on stderr, from global rank 0 only."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"warning: {message}", file=sys.stderr)


class EqualBatches:
    """A validation loader cut to the shortest rank's number of batches (one all-reduce per batch).

    Under a strategy that shards the model (FSDP2) every forward is a collective, and validation
    splits give ranks uneven shares: the rank with a batch more would wait forever for the others.
    """

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        import torch.distributed as dist

        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        batches = iter(self.loader)
        while True:
            batch = next(batches, None)
            more = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                return
            yield batch


class StreamDataModule(pl.LightningDataModule):
    """Shard sources -> ``ShardStream`` batches for training and validation (see the module docstring).

    shards / sources / val_shards: shard specs (``ldm.data.shards``); a local spec naming no shard
        fails in ``setup``, before training starts.
    The others are the streams' (``ldm.data.streams.ShardStream``) and the loaders'.
    """

    # whether a stream's workers have positions a checkpoint must hold (a folder's plan needs none)
    stateful_streams = True

    def __init__(
        self,
        shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        sources: Any = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        read_timeout: float | None = 300.0,
        max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
        prepare: Callable[[], Any] | None = None,
    ):
        super().__init__()
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise UserError(f"data.samples_per_epoch must be positive or null, not {samples_per_epoch}")
        self.shards = shards
        self.sources = sources
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.read_timeout = read_timeout
        self.max_member_bytes = max_member_bytes
        self.prepare = prepare
        self.train_sample: Any = None  # raw sample, rng -> training sample (set by subclasses)
        self.val_sample: Any = None
        self.train_sources: list[Source] = []
        self.val_urls: list[str] = []
        self.epoch_base = (0, 0)  # (epoch, batches trained before it): where epoch counting starts
        self._saved: dict[str, Any] | None = None  # a checkpoint's data position, until resolved
        self._start_states: dict[tuple[int, int], WorkerStates] = {}
        self._train_loader: TrainingLoader | None = None

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.train_sources = resolve_sources(self.shards, self.sources)
        self.val_urls = expand_shards(self.val_shards) if self.val_shards else []

    # ------------------------------------------------------------------ place and position
    def _place(self) -> tuple[int | None, int | None]:
        """(rank, world size) from the trainer; (None, None) without one."""
        trainer = self.trainer
        if trainer is None:
            return None, None
        return trainer.global_rank, trainer.world_size

    def _trained(self) -> int:
        """Training batches this rank has trained on (optimiser steps x accumulation)."""
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it this rank already trained on): (0, 0) for a new run.

        Counted from the optimiser steps, which checkpoints are written between, from ``epoch_base``;
        an epoch holds ``batches_per_epoch`` batches per rank, or never ends (samples_per_epoch null)."""
        if self.trainer is None:
            return 0, 0
        base_epoch, base_trained = self.epoch_base
        trained = self._trained() - base_trained
        per_epoch = self.batches_per_epoch(self.trainer.world_size)
        return (base_epoch + trained // per_epoch, trained % per_epoch) if per_epoch else (base_epoch, trained)

    def batches_per_epoch(self, world_size: int) -> int | None:
        """Training batches per rank and epoch (every worker yields the same number), or None."""
        if not self.samples_per_epoch:
            return None
        workers = max(self.num_workers, 1)
        return math.ceil(self.samples_per_epoch / (world_size * workers * self.batch_size)) * workers

    # ------------------------------------------------------------------ loaders
    def _loader(self, stream: Any, num_workers: int, persistent: bool = True) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,  # the stream batches (and attaches the skip counts) itself
            num_workers=num_workers,
            # training restarts its workers at each epoch so that they start at the new position
            persistent_workers=persistent and num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # its own generator: creating a loader iterator draws a worker seed, and drawing it
            # from torch's global generator would shift the model's random numbers on resume
            generator=torch.Generator().manual_seed(self.seed or 0),
        )

    def train_stream(self) -> Any:
        """This rank's training stream (``ShardStream`` of ``train_sample``)."""
        if not self.train_sources:
            raise ShardSpecError("train_dataloader() before setup(): no shards resolved")
        rank, world_size = self._place()
        return ShardStream(
            self.train_sources,
            self.train_sample,
            self.batch_size,
            train=True,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            samples_per_epoch=self.samples_per_epoch,
            rank=rank,
            world_size=world_size,
            read_timeout=self.read_timeout,
            max_member_bytes=self.max_member_bytes,
        )

    def train_dataloader(self) -> TrainingLoader:
        stream = self.train_stream()
        self._resolve_resume()
        make_loader = partial(self._loader, num_workers=self.num_workers, persistent=False)
        self._train_loader = TrainingLoader(stream, make_loader, self.num_workers, self._position, self._worker_states)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        rank, world_size = self._place()
        stream = ShardStream(
            [Source(self.val_urls)],
            self.val_sample,
            self.val_batch_size,
            train=False,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            read_timeout=self.read_timeout,
            max_member_bytes=self.max_member_bytes,
        )
        # no more workers than this rank has shards: the extra ones would only start and stop
        world_size, rank = world_size or 1, rank or 0
        split_samples = len(self.val_urls) < world_size  # (then every rank reads every shard)
        rank_shards = len(self.val_urls) if split_samples else len(self.val_urls[rank::world_size])
        return self.val_loader(self._loader(stream, min(self.num_workers, rank_shards)))

    def val_loader(self, loader: DataLoader) -> DataLoader | EqualBatches:
        """``loader``, or under a strategy that shards the model, ``EqualBatches`` of it."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        sharded = getattr(strategy, "shards_parameters", False) and self.trainer.world_size > 1
        return EqualBatches(loader) if sharded else loader

    # ------------------------------------------------------------------ the position in checkpoints
    def shape(self) -> dict[str, Any]:
        """What a data position is only valid for: a resumed run of another shape cannot continue it."""
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        shape = {
            "world_size": world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches if trainer is not None else 1,
            "batch_size": self.batch_size,
            "batches_per_epoch": self.batches_per_epoch(world_size),
            "seed": self.seed,
            "data": self.data_digest(),
        }
        if self.stateful_streams:
            shape.update(num_workers=max(self.num_workers, 1), shuffle_buffer=self.shuffle_buffer)
        return shape

    def data_digest(self) -> str:
        """A short hash of the training sources (urls and weights)."""
        digest = hashlib.sha256()
        for source in self.train_sources:
            digest.update(f"{source.weight!r}\0{len(source.urls)}\0".encode())
            digest.update("\0".join(source.urls).encode())
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Every rank's data position (a collective: Lightning calls it on every rank when saving)."""
        if self._train_loader is None:
            return {}
        ranks = _gather(self._train_loader.position_state())
        return {"format": POSITION_FORMAT, "shape": self.shape(), "epoch_base": list(self.epoch_base), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's data position; it is checked against this run when training starts."""
        self._saved = dict(state_dict) if state_dict.get("format") == POSITION_FORMAT else None

    def _worker_states(self, epoch: int, done: int) -> WorkerStates | None:
        return self._start_states.get((epoch, done))

    def _resolve_resume(self) -> None:
        """At the first training loader of a resumed run: continue the checkpoint's position, or
        (another shape, or none saved) start a new epoch at the resumed step."""
        trained = self._trained()
        saved, self._saved = self._saved, None
        if saved is None:
            if trained and self._train_loader is None:
                epoch, _ = self._position()
                self.epoch_base = (epoch + 1, trained)
                _warn(
                    f"data: the checkpoint holds no data position: a new epoch ({epoch + 1}) of freshly seeded "
                    f"streams starts at step {self.trainer.global_step}"
                )
            return
        ranks = saved["ranks"]
        last_epoch = max(int(rank["epoch"]) for rank in ranks)
        problem = self._shape_difference(saved["shape"])
        if problem is None:
            self.epoch_base = (int(saved["epoch_base"][0]), int(saved["epoch_base"][1]))
            epoch, done = self._position()
            if any((int(rank["epoch"]), int(rank["done"])) != (epoch, done) for rank in ranks):
                problem = f"it was saved at epoch {ranks[0]['epoch']} batch {ranks[0]['done']}, not at this step"
            elif self.stateful_streams and done and any(rank["workers"] is None for rank in ranks):
                problem = "it lacks the stream position of some rank"
            else:
                self._start_states[(epoch, done)] = ranks[self.trainer.global_rank]["workers"]
                return
        self.epoch_base = (last_epoch + 1, trained)
        _warn(
            f"data: the checkpoint's data position cannot be continued ({problem}): a new epoch "
            f"({last_epoch + 1}) of freshly seeded streams starts at step {self.trainer.global_step}; "
            f"no sample order of the run is repeated, but it is not the order an uninterrupted run reads"
        )

    def _shape_difference(self, saved: dict[str, Any]) -> str | None:
        names = {
            "world_size": "ranks",
            "num_workers": "loader workers per rank",
            "batch_size": "data.batch_size",
            "accumulate_grad_batches": "trainer.accumulate_grad_batches",
            "seed": "data.seed",
            "batches_per_epoch": "batches per epoch",
            "shuffle_buffer": "data.shuffle_buffer",
            "data": "training shards",
        }
        for key, now in self.shape().items():
            before = saved.get(key)
            if before != now:
                return f"{names.get(key, key)}: {before} then, {now} now"
        return None
