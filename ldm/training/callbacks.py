"""Lightning callbacks: checkpoints, progress, sample grids for fixed prompts, the run summary."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

from ldm import atomic
from ldm.checkpoints import save_safetensors
from ldm.errors import UserError
from ldm.pipeline import Sampler
from ldm.training.autoencoder import estimate_scaling_factor
from ldm.training.latent_diffusion import fingerprint
from ldm.training.sharding import is_sharded


def batch_size(batch: dict[str, Any]) -> int:
    """Number of samples in a training batch (for Lightning's ThroughputMonitor)."""
    return len(batch["latent"]) if "latent" in batch else len(batch["image"])


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that state restored from a checkpoint cannot name
    files outside this run's checkpoint directory.

    Lightning restores ``best_k_models``, ``kth_best_model_path``, ``best_model_path`` and
    ``last_model_path`` from the checkpoint it resumes, and later deletes those paths as it rotates
    files; its own check does not resolve ``..``, so a foreign checkpoint naming
    ``<dirpath>/../../victim`` would delete ``victim``. Here every restored path must resolve
    inside ``dirpath``; otherwise the whole restored state is dropped (with one warning) and the
    callback starts as on a fresh run: it only forgets which older files to rotate away.
    """

    @property
    def state_key(self) -> str:
        # Lightning's key for ModelCheckpoint, so checkpoints written before this class still restore
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        outside = [p for p in restored_paths(state_dict) if not _inside(p, self.dirpath)]
        if outside:
            print(
                f"warning: ignoring the checkpoint callback state of the resumed checkpoint: it names "
                f"{outside[0]!r}, outside {self.dirpath} (nothing there will be deleted)",
                file=sys.stderr,
            )
            return
        super().load_state_dict(state_dict)


def restored_paths(state_dict: dict[str, Any]) -> list[str]:
    """Every file path a ``ModelCheckpoint`` state names (the ones Lightning may later delete)."""
    best_k = state_dict.get("best_k_models") or {}
    named = [state_dict.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")]
    paths = [*(best_k.keys() if isinstance(best_k, dict) else [best_k]), *named]
    return [str(p) for p in paths if p not in (None, "")]


def _inside(path: str, directory: str | None) -> bool:
    if directory is None:
        return False
    if "://" in path or "://" in str(directory):  # object storage: same prefix, no ".." segment
        return path.startswith(str(directory).rstrip("/") + "/") and ".." not in path.split("/")
    root = Path(directory).resolve()
    resolved = Path(path).resolve()  # follows "..", and symlinks that point elsewhere
    return root in resolved.parents


class StepProgressBar(TQDMProgressBar):
    """A tqdm bar over optimiser steps up to ``trainer.max_steps``, with rate and ETA.

    Lightning's default bar counts batches of an epoch, which streaming (resampled) shards do not
    have, so it shows neither a total nor an ETA.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        bar.unit = "step"
        bar.set_description("train")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and self._should_update(step, bar.total or 0):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()


class SampleGrid(pl.Callback):
    """Sample a grid of images for fixed prompts and seeds every ``every_n_steps`` and at the end.

    Rows are prompts, columns seeds; grids go to ``<run dir>/samples/step_XXXXXXX.png`` (with the
    prompts beside them in a .json) and to the logger as images. Runs on global rank 0 only, except
    where the U-Net is sharded (FSDP2): then every forward is a collective, so every rank samples the
    same grid and rank 0 writes it.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        sampler: Sampler,
        every_n_steps: int = 500,
        images_per_prompt: int = 4,
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
        use_ema: bool = True,
    ):
        self.prompts = list(prompts)
        self.sampler = sampler
        self.every_n_steps = every_n_steps
        self.images_per_prompt = images_per_prompt
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.use_ema = use_ema
        self._last_step = -1

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number is noise in a progress bar
        return metrics

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.render(trainer, pl_module)

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        step = trainer.global_step
        sharded = is_sharded(pl_module.unet) if hasattr(pl_module, "unet") else False
        if not (trainer.is_global_zero or sharded) or step == self._last_step or not self.prompts:
            return None
        self._last_step = step
        pipeline = pl_module.pipeline(use_ema=self.use_ema)
        prompts = [p for p in self.prompts for _ in range(self.images_per_prompt)]
        seeds = [self.seed + i for _ in self.prompts for i in range(self.images_per_prompt)]
        images = pipeline(prompts, seeds, self.sampler, self.num_steps, self.guidance_scale)
        if not trainer.is_global_zero:
            return None
        grid = make_grid(images, nrow=self.images_per_prompt, padding=2, pad_value=1.0)
        path = Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as temp:
            save_image(grid, temp, format="png")
        atomic.write_text(
            path.with_suffix(".json"), json.dumps({"rows": self.prompts, "seeds": seeds[: self.images_per_prompt]})
        )
        self._log(trainer, grid, path, step)
        return path

    def _log(self, trainer: pl.Trainer, grid: torch.Tensor, path: Path, step: int) -> None:
        caption = " | ".join(self.prompts)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", images=[str(path)], caption=[caption], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=step)


class ExportAutoencoder(pl.Callback):
    """At the end of first-stage training, write the autoencoder's weights as safetensors with
    the latent scaling factor measured on validation data (1 / std of posterior samples; the
    configured one where only the decoder was trained) in the file's metadata, ready to be the
    frozen VAE of a diffusion model."""

    def __init__(self, filename: str = "autoencoder.safetensors", scaling_batches: int = 20):
        self.filename = filename
        self.scaling_batches = scaling_batches

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        autoencoder = pl_module.autoencoder
        if getattr(pl_module, "trainable", "all") == "decoder":
            factor = autoencoder.scaling_factor  # the encoder, so every latent, is what it was
        else:
            loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
            if loader is None:  # not `not loader`: a loader over a stream has no len()
                loader = trainer.datamodule.train_dataloader()
            factor = estimate_scaling_factor(autoencoder, loader, max_batches=self.scaling_batches)
        path = Path(trainer.default_root_dir) / self.filename
        save_safetensors(autoencoder.state_dict(), path, metadata={"scaling_factor": f"{factor:.6f}"})
        print(f"autoencoder weights: {path} (latent scaling factor {factor:.5f})")


class RunSummary(pl.Callback):
    """The run's shape at the start (global batch = micro-batch x accumulation x world size,
    checked against ``expected_global_batch`` when given) and one screen of results at the end:
    steps, time, throughput, losses, skipped steps, where everything is, and whether the U-Net
    weights are identical on every rank (a DDP desync shows up here, not weeks later)."""

    def __init__(self, expected_global_batch: int | None = None):
        self.expected_global_batch = expected_global_batch
        self._start_time: float | None = None
        self._start_step = 0
        self._samples = 0  # counted on this rank: right even where the datamodule has no batch_size

    @staticmethod
    def global_batch(trainer: pl.Trainer) -> tuple[int, int, int, int]:
        micro = int(getattr(trainer.datamodule, "batch_size", 0) or 0)
        accumulation = int(trainer.accumulate_grad_batches)
        return micro * accumulation * trainer.world_size, micro, accumulation, trainer.world_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total, micro, accumulation, world = self.global_batch(trainer)
        if self.expected_global_batch is not None and total != self.expected_global_batch:
            raise UserError(
                f"global batch {total} = {micro} (data.batch_size) x {accumulation} (accumulate_grad_batches) "
                f"x {world} (devices x nodes), but expected_global_batch is {self.expected_global_batch}"
            )
        if trainer.is_global_zero:
            print(
                f"global batch {total} = {micro} per device x {accumulation} accumulation x {world} devices "
                f"({trainer.num_nodes} node(s)); precision {trainer.precision}; "
                f"{trainer.max_steps} steps = {trainer.max_steps * total:,} samples"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._start_time = time.perf_counter()
        self._start_step = trainer.global_step
        self._samples = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += batch_size(batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        in_sync = _weights_in_sync(pl_module)
        if not trainer.is_global_zero or self._start_time is None:
            return
        seconds = time.perf_counter() - self._start_time
        steps = trainer.global_step - self._start_step
        samples = self._samples * trainer.world_size  # ranks run equal batches
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        lines = [
            "-" * 72,
            f"run summary: {steps} steps in {seconds / 60:.1f} min "
            f"({steps / max(seconds, 1e-9):.2f} steps/s, {samples / max(seconds, 1e-9):.1f} samples/s over "
            f"{trainer.world_size} device(s)); global step {trainer.global_step}",
            "  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("train/", "val/"))),
            f"  U-Net weights sharded over {trainer.world_size} ranks (FSDP2)"
            if _sharded(pl_module)
            else f"  U-Net weights identical on all ranks: {'yes' if in_sync else 'NO (desynchronised!)'}",
            f"  run directory: {Path(trainer.default_root_dir).resolve()}",
            "-" * 72,
        ]
        print("\n".join(lines))


def _sharded(pl_module: pl.LightningModule) -> bool:
    network = getattr(pl_module, "unet", None)
    return network is not None and is_sharded(network)


def _weights_in_sync(pl_module: pl.LightningModule) -> bool:
    """Whether every rank holds the same U-Net weights (a collective: called on all ranks)."""
    import torch.distributed as dist

    network = getattr(pl_module, "unet", None) or getattr(pl_module, "autoencoder", None)
    if network is None or not (dist.is_available() and dist.is_initialized()) or is_sharded(network):
        return True  # (a sharded U-Net is one copy: each rank holds its own part)
    prints: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, fingerprint(network))
    return len(set(prints)) == 1
