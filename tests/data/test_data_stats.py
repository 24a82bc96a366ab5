"""The DataSkipReport callback: sums the counts batches carry, logs them, reports at the end."""

import csv
from collections import Counter

import pytorch_lightning as pl
from ddp_run import KeyRecorder
from shard_corpus import bad_corpus

from ldm.data.webdataset import ShardDataModule
from ldm.training.data_stats import DataSkipReport, format_report


def test_report_lists_every_count_with_its_share():
    counts = Counter({"skipped/corrupt_image": 3, "filtered/min_aesthetic": 6, "skipped/unreadable_shard": 2})
    report = format_report({"training": (counts, 91), "validation": (Counter(), 0)}, world_size=8)
    lines = report.splitlines()
    assert lines[0] == "data report, 8 ranks:"
    assert lines[1] == "  training: 91 samples delivered, 3 skipped (3.00%), 6 filtered (6.00%)"
    assert lines[2].split() == ["filtered/min_aesthetic", "6", "6.00%"]  # largest first
    assert lines[3].split() == ["skipped/corrupt_image", "3", "3.00%"]
    assert lines[4].split() == ["skipped/unreadable_shard", "2", "shards"]
    assert len(lines) == 5  # an empty stage is left out
    assert "no data seen" in format_report({"training": (Counter(), 0)}, 1)


def test_callback_logs_and_reports_the_counts_of_a_run(tmp_path):
    urls, good, expected = bad_corpus(tmp_path / "shards")
    urls = [url for url in urls if "sleep" not in url and "missing" not in url]  # (setup refuses a missing file)
    expected = {**expected, "skipped/unreadable_shard": 3}
    del expected["skipped/stalled_shard"]
    datamodule = ShardDataModule(
        shards=urls,
        val_shards=urls,
        image_size=8,
        batch_size=2,
        num_workers=0,
        max_pixels=1_000_000,
        filters={"max_unsafe": 0.5},
        caption_keys=["txt"],
        shuffle_buffer=4,
        read_timeout=0.5,
    )
    report = DataSkipReport(every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        val_check_interval=6,
        limit_val_batches=100,
        logger=pl.loggers.CSVLogger(tmp_path, name="logs", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[report],
        use_distributed_sampler=False,
    )
    trainer.fit(KeyRecorder(tmp_path), datamodule=datamodule)

    assert report.samples["train"] == 12
    assert report.samples["val"] == len(good) and dict(report.counts["val"]) == expected
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    steps = sorted({int(row["step"]) for row in rows if row.get("data/samples")})
    assert steps == [2, 4, 6]
    val_row = next(row for row in rows if row.get("data/val/samples"))
    assert float(val_row["data/val/skipped/truncated_shard"]) == 3
    assert report.report.startswith("data report, 1 rank:")
    assert f"validation: {len(good)} samples delivered, 8 skipped (32.00%), 1 filtered (4.00%)" in report.report


def test_truncated_samples_are_delivered_not_dropped():
    counts = Counter({"truncated/caption": 10, "skipped/corrupt_image": 10})
    report = format_report({"training": (counts, 90)}, world_size=1)
    assert "10 skipped (10.00%)" in report  # 10 of 100 read, the 10 cut captions among the 90 delivered
