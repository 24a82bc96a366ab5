"""Training throughput and the framework's per-step overhead.

    python bench/train_overhead.py [--batch 16] [--steps 60] [--warmup 10] [--repeats 2] [overrides...]

Times the same U-Net training step two ways in one process, on the same precomputed latent batches:
  bare       a plain PyTorch loop: U-Net forward, diffusion loss, backward, AdamW step
  framework  train.py's LightningModule in a Lightning Trainer with the default callbacks (EMA,
             logging, throughput, run guard, data report, checkpoint callbacks at their configured
             cadence, so the timed steps hold no save) and the config's gradient clipping
and prints images/s for both and the per-step overhead (target: <= 5%), plus model FLOPs/s
(and MFU on GPUs whose peak is known). Medians over --repeats alternating runs. The checkpoint
cadence is then priced apart: the time of one save, and its share of the steps between two saves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import resolved_config  # noqa: E402


class LatentBatches(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.device_ids and torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def make_task(cfg):
    return instantiate(cfg.task, _partial_=True, _convert_="all")(run_config=resolved_config(cfg))


def bare_loop(cfg, batches, steps: int, warmup: int, device) -> float:
    task = make_task(cfg).to(device)
    optimizer = task.optimizer_factory(task.unet.parameters())  # the config's optimiser, as the framework uses
    start = None
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = task.diffusion_loss(batch["latent"].to(device), batch["context"].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step + 1 == warmup:
            start = time.perf_counter()
    return (time.perf_counter() - start) / (steps - warmup)


def framework(cfg, batches, steps: int, warmup: int, out: Path) -> tuple[float, float]:
    """(seconds per step without saves, seconds per checkpoint save)."""
    task = make_task(cfg)
    callbacks = [
        instantiate(c, _convert_="all")
        for name, c in cfg.callbacks.items()
        if c is not None and name not in ("sample_grid", "progress_bar")
    ]
    for callback in callbacks:
        if isinstance(callback, pl.callbacks.ModelCheckpoint):
            callback.dirpath = str(out / "checkpoints")
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=steps,
        logger=pl.loggers.CSVLogger(out),
        callbacks=[*callbacks, timer],
        limit_val_batches=0,
        enable_progress_bar=False,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        precision=cfg.trainer.precision,
        gradient_clip_val=None,
        default_root_dir=out,
    )
    loader = torch.utils.data.DataLoader(LatentBatches(batches), batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    saves = []
    for _ in range(3):
        start = time.perf_counter()
        trainer.save_checkpoint(out / "probe.ckpt")
        saves.append(time.perf_counter() - start)
    return (timer.end - timer.start) / (steps - warmup), statistics.median(saves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=sd15")
    args = parser.parse_args()

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model.autoencoder.path=null", *args.overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    out = Path(tempfile.mkdtemp(prefix="ldm_bench_"))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = make_task(cfg)
    context_shape = (probe.conditioner.max_length, probe.conditioner.context_dim)
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "latent": torch.randn(args.batch, *probe.latent_shape, generator=generator),
            "context": torch.randn(args.batch, *context_shape, generator=generator),
        }
        for _ in range(4)
    ]
    flops = probe._count_flops(batches[0])
    del probe

    times: dict[str, list[float]] = {"bare": [], "framework": [], "save": []}
    for _ in range(args.repeats):
        times["bare"].append(bare_loop(cfg, batches, args.steps, args.warmup, device))
        step, save = framework(cfg, batches, args.steps, args.warmup, out)
        times["framework"].append(step)
        times["save"].append(save)
    bare, full = statistics.median(times["bare"]), statistics.median(times["framework"])
    print(f"U-Net training step, batch {args.batch}, {device}, {flops / 1e9:.2f} GFLOP/step")
    for name, seconds in (("bare loop", bare), ("framework", full)):
        print(
            f"  {name:<10} {seconds * 1000:8.1f} ms/step {args.batch / seconds:8.1f} images/s "
            f"{flops / seconds / 1e12:8.3f} TFLOP/s"
        )
    overhead = full / bare - 1
    print(
        f"  framework overhead: {100 * overhead:+.1f}% of a bare step "
        f"({'within' if overhead <= 0.05 else 'above'} the 5% target)"
    )
    save, every = statistics.median(times["save"]), cfg.callbacks.checkpoint.every_n_train_steps
    print(
        f"  a checkpoint save: {save:.2f} s = {100 * save / (every * full):.2f}% of the {every} steps "
        f"between saves (callbacks.checkpoint.every_n_train_steps)"
    )


if __name__ == "__main__":
    main()
