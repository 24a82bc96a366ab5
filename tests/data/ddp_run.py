"""A 2-process DDP run on the CPU (gloo) over uneven shards, recording the sample keys each rank sees.

Run by tests/data/test_distributed.py as a script, once per rank (``ldm_testing.launch_ranks``):
``python ddp_run.py OUT_DIR TRAIN_SPEC VAL_SPEC``. Each rank writes
``OUT_DIR/rank<r>.json``; rank 0 also writes the DataSkipReport's report to ``OUT_DIR/report.txt``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldm.data.webdataset import ShardDataModule
from ldm.training.data_stats import DataSkipReport


class KeyRecorder(pl.LightningModule):
    """A one-layer model that records the keys of every batch it trains and validates on."""

    def __init__(self, out: Path):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.out = out
        self.train_keys: list[list[str]] = []
        self.val_keys: list[list[str]] = [[]]

    def training_step(self, batch, batch_idx):
        self.train_keys.append(list(batch["key"]))
        return self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean()  # (B, 3) -> scalar

    def validation_step(self, batch, batch_idx):
        self.val_keys[-1].extend(batch["key"])
        self.log(
            "val/loss",
            self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean(),
            sync_dist=True,
            batch_size=len(batch["key"]),
        )

    def on_validation_epoch_end(self):
        self.val_keys.append([])

    def on_train_end(self):
        record = {
            "rank": self.global_rank,
            "global_step": self.global_step,
            "train": self.train_keys,
            "val": [keys for keys in self.val_keys if keys],
        }
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(out: Path, train_spec: str, val_spec: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    datamodule = ShardDataModule(
        shards=json.loads(train_spec),
        val_shards=json.loads(val_spec),
        image_size=8,
        batch_size=4,
        num_workers=2,
        shuffle_buffer=8,
        samples_per_epoch=48,
        seed=3,
    )
    report = DataSkipReport(every_n_steps=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=12,
        use_distributed_sampler=False,
        logger=pl.loggers.CSVLogger(out, name="logs", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[report],
    )
    trainer.fit(KeyRecorder(out), datamodule=datamodule)
    if trainer.is_global_zero:
        (out / "report.txt").write_text(report.report)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
