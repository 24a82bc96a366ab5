"""Shared test helpers: the real Hydra configs shrunk to tiny sizes (imported by tests and conftest)."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# A tiny but complete model: same code paths as the toy, sizes a test can afford.
TINY_MODEL = [
    "model.unet.model_channels=32",
    "model.unet.channel_multipliers=[1,1]",
    "model.unet.attention_resolutions=[2]",
    "model.unet.num_heads=2",
    "model.unet.context_dim=32",
    "model.autoencoder.path=null",
    "model.autoencoder.module.channel_multipliers=[1,1]",
    "model.conditioner.text_cfg.width=32",
    "model.conditioner.text_cfg.heads=2",
    "model.conditioner.text_cfg.layers=1",
]
TINY_TRAINING = [
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "data.image_size=32",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.sample_grid.prompts=[a red circle in the top left]",
    "callbacks.sample_grid.images_per_prompt=2",
    "callbacks.sample_grid.num_steps=2",
    "optim.lr_scheduler.schedule.warmup_steps=1",
    "logger=csv",
]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose a real config of ``configs/`` the way ``@hydra.main`` would (Hydra runtime set)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg



class StopAfterStep(pl.Callback):
    """Ends training after ``step`` optimiser steps, as a preemption would: the run keeps its full
    ``max_steps``, so step-dependent schedules (cosine decay) are those of the whole run."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class SignalAtStep(pl.Callback):
    """Sends this process a real signal (default SIGTERM) once, after optimiser step ``step``, as a
    scheduler's preemption notice would; what the run does with it is up to its handlers."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.signal_name, self.sent = step, signal_name, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def train_tiny_checkpoint(run_dir: Path, toy_data_dir: Path, steps: int, overrides: Sequence[str] = ()) -> Path:
    """Train the tiny model ``steps`` steps on the small toy data (plus Hydra ``overrides``); its ``last.ckpt``."""
    from omegaconf import open_dict

    from train import train

    cfg = compose_config(
        "train", [*TINY_MODEL, *TINY_TRAINING, "~callbacks.sample_grid", f"trainer.max_steps={steps}", *overrides]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.data_dir = str(toy_data_dir)
        cfg.data.prepare.num_train, cfg.data.prepare.num_val = 256, 32
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def run_script(script: str, *args: str) -> int:
    """Run one of the project's command-line scripts in this process, as `python SCRIPT ARGS...` would
    (Hydra's command-line parsing and error reporting included), and return its exit status.

    Saves the ~10 s a fresh interpreter spends importing Lightning; read what it printed with capsys.
    """
    saved_argv = sys.argv
    sys.argv = [str(ROOT / script), *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
    return 0
