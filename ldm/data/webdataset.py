"""webdataset pipelines from image-caption shards to training batches."""

from __future__ import annotations

from typing import Any, Callable

import pytorch_lightning as pl
import torch
import webdataset as wds

from ldm.data.shards import expand_shards
from ldm.data.transforms import ImageTransform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class ToTrainingSample:
    """A decoded webdataset sample -> {"image": (3,H,W) in [-1,1], "caption": str}."""

    def __init__(self, transform: ImageTransform, caption_key: str = "txt"):
        self.transform = transform
        self.caption_key = caption_key

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image member")
        caption = sample.get(self.caption_key, "")
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        return {"image": self.transform(sample[image_key]), "caption": str(caption).strip()}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
    }


def image_caption_pipeline(
    urls: list[str],
    transform: ImageTransform,
    batch_size: int,
    train: bool,
    shuffle_buffer: int = 1000,
    caption_key: str = "txt",
    handler: Callable[[Exception], bool] = wds.warn_and_continue,
) -> wds.DataPipeline:
    """Shards -> batches. Training reads resampled shards forever (each rank and worker draws
    its own shard order), so every rank runs the same number of steps whatever the shard sizes;
    validation reads each shard once, split across ranks and workers."""
    if train:
        source = [wds.ResampledShards(urls)]
    else:
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = [
        *source,
        wds.tarfile_to_samples(handler=handler),
        *([wds.shuffle(shuffle_buffer)] if train and shuffle_buffer > 1 else []),
        wds.decode("pil", handler=handler),
        wds.map(ToTrainingSample(transform, caption_key), handler=handler),
        wds.batched(batch_size, collation_fn=collate, partial=not train),
    ]
    return wds.DataPipeline(*stages)


class ShardDataModule(pl.LightningDataModule):
    """Image-caption webdataset shards for training and validation.

    shards / val_shards: shard specs (see ``expand_shards``); a spec naming no shard fails in
        ``setup``, before training starts.
    prepare: an optional callable run once (rank 0) before reading, e.g. to generate the toy shards.
    """

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        image_size: int = 256,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_key: str = "txt",
        prepare: Callable[[], Any] | None = None,
    ):
        super().__init__()
        self.shards = shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.caption_key = caption_key
        self.prepare = prepare
        self.train_transform = ImageTransform(image_size, center_crop=center_crop, random_flip=random_flip)
        self.val_transform = ImageTransform(image_size, center_crop=True, random_flip=False)

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.train_urls = expand_shards(self.shards)
        self.val_urls = expand_shards(self.val_shards) if self.val_shards else []

    def _loader(self, pipeline: wds.DataPipeline, num_workers: int) -> wds.WebLoader:
        return wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> wds.WebLoader:
        pipeline = image_caption_pipeline(
            self.train_urls, self.train_transform, self.batch_size, True, self.shuffle_buffer, self.caption_key
        )
        return self._loader(pipeline, self.num_workers)

    def val_dataloader(self) -> wds.WebLoader | list:
        if not self.val_urls:
            return []
        pipeline = image_caption_pipeline(self.val_urls, self.val_transform, self.val_batch_size, False)
        # never more workers than shards: webdataset refuses workers with no shard to read
        return self._loader(pipeline, min(self.num_workers, len(self.val_urls)))
