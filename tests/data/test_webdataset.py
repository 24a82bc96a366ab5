import itertools

import torch

from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import ShardDataModule, image_caption_pipeline


def test_training_batches_from_toy_shards(toy_data_dir):
    urls = sorted(str(p) for p in (toy_data_dir / "toy").glob("train-*.tar"))
    pipeline = image_caption_pipeline(urls, ImageTransform(64), batch_size=8, train=True, shuffle_buffer=16)
    batches = list(itertools.islice(iter(pipeline), 3))
    for batch in batches:
        assert batch["image"].shape == (8, 3, 64, 64)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert len(batch["caption"]) == 8 and all(c.startswith("a ") for c in batch["caption"])


def test_validation_reads_each_sample_once(toy_data_dir):
    urls = sorted(str(p) for p in (toy_data_dir / "toy").glob("val-*.tar"))
    pipeline = image_caption_pipeline(urls, ImageTransform(64), batch_size=10, train=False)
    sizes = [len(b["caption"]) for b in pipeline]
    assert sum(sizes) == 32 and sizes[-1] == 2  # the last partial batch is kept


def test_datamodule_runs_prepare_and_checks_specs(toy_data_dir):
    calls = []
    datamodule = ShardDataModule(
        shards=str(toy_data_dir / "toy" / "train-*.tar"), val_shards=str(toy_data_dir / "toy" / "val-*.tar"),
        image_size=32, batch_size=4, num_workers=0, prepare=lambda: calls.append(1),
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert calls == [1] and len(datamodule.train_urls) == 2
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
