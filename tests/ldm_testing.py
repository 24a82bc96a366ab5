"""Shared test helpers: the real Hydra configs shrunk to tiny sizes (imported by tests and conftest)."""

from __future__ import annotations

import os
import runpy
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def _overrides_of(experiment: Path) -> list[str]:
    """An experiment file's settings as command-line overrides (``key.path=value``, and ``group=option``
    for its ``override /group: option`` defaults), so tests can leave out the ones they replace."""
    raw = OmegaConf.to_container(OmegaConf.load(experiment))
    groups = [
        f"{k.split('/')[-1]}={v}"
        for d in raw.pop("defaults", [])
        if isinstance(d, dict)
        for k, v in d.items()
        if k.startswith("override /") and k != "override /model"
    ]
    raw.pop("run_name", None)

    def flat(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [item for key, value in node.items() for item in flat(value, f"{prefix}{key}.")]
        value = (
            "[" + ",".join(map(str, node)) + "]"
            if isinstance(node, list)
            else str(node).lower()
            if isinstance(node, bool)
            else node
        )
        return [f"{prefix[:-1]}={value}"]

    return flat(raw, "") + groups


# The tiny model (configs/model/tiny.yaml) and experiment=tiny's short training, as overrides of the
# default (toy) config: the same code paths as the toy, sizes a test can afford.
TINY_MODEL = ["model=tiny"]
TINY_TRAINING = _overrides_of(CONFIGS / "experiment" / "tiny.yaml")


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


def run_training_loader(
    make_stream, workers: int, done: int, states, count: int, save_at: int | None = None, epoch: int = 0
):
    """``count`` batches of a ``TrainingLoader`` over ``make_stream()`` started at batch ``done`` of
    ``epoch`` (with the per-worker ``states`` of a checkpoint), and its ``position_state()`` once
    ``save_at`` batches from the start have been trained (Lightning fetches one ahead: the state is
    taken when batch ``save_at`` has been handed out). Returns (batches, position state or None)."""
    import itertools

    from torch.utils.data import DataLoader

    from ldm.data.training_loader import TrainingLoader

    trained = {"done": done}
    loader = TrainingLoader(
        make_stream(),
        lambda s: DataLoader(s, batch_size=None, num_workers=workers),
        workers,
        lambda: (epoch, trained["done"]),
        lambda e, at: states if (e, at) == (epoch, done) else None,
    )
    batches, saved = [], None
    for batch in itertools.islice(loader, count):
        batches.append(batch)
        if save_at is not None and len(batches) == save_at - done + 1:
            trained["done"] = save_at
            saved = loader.position_state()
    return batches, saved


def start_ranks(
    command: Sequence[str], cwd: Path, world_size: int = 2, env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """Start ``command`` as ``world_size`` ranks at once, as torchrun would (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT set; Lightning's own launcher would start rank 1 only once rank 0 has
    imported everything: twice the wall time), and return without waiting: for tests that kill a run
    midway. Each rank leads its own process group (``os.killpg`` stops its loader workers too)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": str(world_size),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        **(env or {}),
    }
    return [
        subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(world_size)
    ]


def kill_ranks(ranks: Sequence[subprocess.Popen]) -> list[str]:
    """SIGKILL every rank and its workers (a preemption); returns what each had printed."""
    for rank in ranks:
        if rank.poll() is None:
            os.killpg(rank.pid, signal.SIGKILL)
    return [rank.communicate()[0] for rank in ranks]


def wait_ranks(ranks: Sequence[subprocess.Popen], timeout: float = 240) -> list[str]:
    """Wait for started ranks; returns each rank's output (stdout + stderr). Fails the test, with the
    output, when a rank fails or the ranks run past ``timeout`` seconds (all are then killed)."""
    try:
        outputs = [rank.communicate(timeout=timeout)[0] for rank in ranks]
    except subprocess.TimeoutExpired:
        outputs = kill_ranks(ranks)
        raise AssertionError(f"the {len(ranks)}-rank run hung (> {timeout} s):\n{outputs[0][-3000:]}") from None
    failed = [r for r, rank in enumerate(ranks) if rank.returncode != 0]
    assert not failed, "\n".join(f"rank {r}:\n{outputs[r][-3000:]}" for r in failed)
    return outputs


def launch_ranks(
    command: Sequence[str], cwd: Path, world_size: int = 2, timeout: float = 240, env: dict[str, str] | None = None
) -> list[str]:
    """Run ``command`` as ``world_size`` ranks (``start_ranks``) to the end (``wait_ranks``)."""
    return wait_ranks(start_ranks(command, cwd, world_size, env), timeout)


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
