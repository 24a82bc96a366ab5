"""Skipped and filtered data: sums the counts that batches carry, logs them, reports them at the end."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.data.skips import COUNTS_KEY, SHARD_REASONS, add_counts


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("caption", "image", "latent"):
        if key in batch:
            return len(batch[key])
    return 0


class DataSkipReport(pl.Callback):
    """Sum ``batch["skipped"]`` (see ``ldm.data.skips``) over training and validation batches, log
    the run totals as ``data/skipped/<reason>`` and ``data/filtered/<filter>`` (summed over all
    ranks) every ``every_n_steps`` optimiser steps, and print a one-screen report at the end.

    Totals count from the start of this process (a resumed run starts again from zero). Batches
    without the key (precomputed latents) only add to the sample count.
    """

    def __init__(self, every_n_steps: int = 100):
        self.every_n_steps = every_n_steps
        self.counts = {"train": Counter(), "val": Counter()}
        self.samples = {"train": 0, "val": 0}
        self.report: str = ""
        self._logged_step = -1

    # ------------------------------------------------------------------ collecting
    def _add(self, stage: str, batch: Any) -> None:
        if isinstance(batch, Mapping):
            add_counts(self.counts[stage], batch.get(COUNTS_KEY))
            self.samples[stage] += _batch_size(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._add("train", batch)
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._logged_step:
            self._logged_step = step  # (global_step is the same on every rank: the gather below is safe)
            self._log(trainer, "train", step)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._add("val", batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, "val", trainer.global_step)

    # ------------------------------------------------------------------ totals over ranks
    def totals(self, trainer: pl.Trainer | None, stage: str) -> tuple[Counter, int]:
        """(counts, samples) of ``stage`` summed over all ranks; a collective: call it on every rank."""
        counts, samples = self.counts[stage], self.samples[stage]
        if trainer is None or trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return Counter(counts), samples
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (dict(counts), samples))
        total: Counter = Counter()
        for rank_counts, _ in gathered:
            add_counts(total, rank_counts)
        return total, sum(rank_samples for _, rank_samples in gathered)

    def _log(self, trainer: pl.Trainer, stage: str, step: int) -> None:
        counts, samples = self.totals(trainer, stage)
        if not trainer.is_global_zero:
            return
        prefix = "data/" if stage == "train" else "data/val/"
        metrics = {f"{prefix}{key}": float(value) for key, value in sorted(counts.items())}
        metrics[f"{prefix}samples"] = float(samples)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ the report
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train, val = self.totals(trainer, "train"), self.totals(trainer, "val")
        if trainer.is_global_zero:
            self.report = format_report({"training": train, "validation": val}, trainer.world_size)
            print(self.report, file=sys.stderr, flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # other ranks may be gone: report this rank's own counts, without a collective
        stages = {
            "training": (Counter(self.counts["train"]), self.samples["train"]),
            "validation": (Counter(self.counts["val"]), self.samples["val"]),
        }
        if not any(delivered or counts for counts, delivered in stages.values()):
            return  # failed before reading anything (bad path, bad config): the error says it all
        self.report = format_report(stages, 1, note=f" (rank {trainer.global_rank} only: the run failed)")
        print(self.report, file=sys.stderr, flush=True)


def format_report(stages: Mapping[str, tuple[Counter, int]], world_size: int, note: str = "") -> str:
    """A short table per stage: samples delivered, then each count with its share of samples read."""
    lines = [f"data report, {world_size} rank{'s' if world_size != 1 else ''}{note}:"]
    for stage, (counts, delivered) in stages.items():
        if not delivered and not counts:
            continue
        # truncated/* samples were delivered (only cut), so they are not part of what was read besides
        sample_counts = {
            k: v
            for k, v in counts.items()
            if k.split("/", 1)[1] not in SHARD_REASONS and not k.startswith("truncated/")
        }
        read = delivered + sum(sample_counts.values())
        skipped = sum(v for k, v in sample_counts.items() if k.startswith("skipped/"))
        filtered = sum(v for k, v in sample_counts.items() if k.startswith("filtered/"))
        lines.append(
            f"  {stage}: {delivered:,} samples delivered, {skipped:,} skipped ({_share(skipped, read)}), "
            f"{filtered:,} filtered ({_share(filtered, read)})"
        )
        for key, value in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            share = "shards" if key.split("/", 1)[1] in SHARD_REASONS else _share(value, read)
            lines.append(f"    {key:<32} {value:>12,}  {share}")
    if len(lines) == 1:
        lines.append("  no data seen")
    return "\n".join(lines)


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.2f}%" if total else "-"
