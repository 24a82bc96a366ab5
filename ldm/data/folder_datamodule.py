"""The DataModule of ``data=folder``: a folder of captioned images (``ldm.data.folder``) -> batches.

It is the shard DataModule with another source: the same decoding, transforms, buckets, uint8
batches turned into [-1, 1] on the device, loaders and resume position (``TrainingLoader``), with the
folder's exact epoch length (``batches_per_epoch``) in place of ``samples_per_epoch``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from torch.utils.data import DataLoader

from ldm.data.captions import DEFAULT_MAX_CAPTION_CHARS
from ldm.data.folder import (
    FolderError,
    FolderIndex,
    FolderStream,
    assign_buckets,
    check_files,
    index_folder,
    problem_summary,
    split_validation,
)
from ldm.data.webdataset import ShardDataModule

log = logging.getLogger("ldm.data")
# a metadata file's caption travels as {"caption": value}; a .txt beside the image as txt
FOLDER_CAPTION_KEYS = ("txt", "json.caption")


class FolderDataModule(ShardDataModule):
    """Images with ``x.txt`` captions, or a ``metadata.jsonl``/``.csv`` (``file_name`` + ``text`` or
    ``caption``), under ``path``; every argument is a key of ``configs/data/folder.yaml``.

    repeats: each image is used this many times per epoch (small sets: fewer, longer epochs).
    val_fraction / val_path: a validation split of ``path`` (by path hash: the same images whatever
        the seed), or a second folder of the same kind; not both.
    caption_column: the metadata's caption column (null: ``text``, else ``caption``).
    The others are ``ShardDataModule``'s (image_size, batch_size, buckets, ...).
    Its epoch plan needs no stream state: a resume with any number of loader workers is exact.
    """

    stateful_streams = False

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_fraction: float = 0.0,
        repeats: int = 1,
        caption_column: str | None = None,
        image_size: int = 512,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        seed: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        small_images: str = "upscale",
        max_pixels: int | None = 50_000_000,
        empty_captions: str = "drop",
        buckets: str | Sequence[Sequence[int]] | None = None,
        bucket_step: int = 64,
        bucket_max_ratio: float = 2.0,
        bucket_no_upscale: bool = False,
        max_caption_chars: int | None = DEFAULT_MAX_CAPTION_CHARS,
        quarantine: str | None = None,
    ):
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            seed=seed,
            center_crop=center_crop,
            random_flip=random_flip,
            small_images=small_images,
            max_pixels=max_pixels,
            caption_keys=FOLDER_CAPTION_KEYS,
            empty_captions=empty_captions,
            buckets=buckets,
            bucket_step=bucket_step,
            bucket_max_ratio=bucket_max_ratio,
            bucket_no_upscale=bucket_no_upscale,
            max_caption_chars=max_caption_chars,
            quarantine=quarantine,
        )
        if repeats < 1 or int(repeats) != repeats:
            raise FolderError(f"data.repeats must be a positive integer, not {repeats}")
        if val_path and val_fraction:
            raise FolderError("set data.val_fraction or data.val_path, not both")
        if not 0 <= val_fraction < 1:
            raise FolderError(f"data.val_fraction must be in [0, 1), not {val_fraction}")
        self.path = path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.repeats = int(repeats)
        self.caption_column = caption_column
        self.max_pixels = max_pixels
        self.train_index: FolderIndex | None = None
        self.val_index: FolderIndex | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_index is not None:
            return  # indexed once per process
        index = self._index(self.path)
        if self.val_path:
            self.val_index = self._index(self.val_path)
            self.val_index.problems = []  # (a validation stream counts what it skips as it reads)
        elif self.val_fraction:
            index, self.val_index = split_validation(index, self.val_fraction)
        if not len(index):
            raise FolderError(f"no usable image in {self.path}{problem_summary(index.problems)}")
        self.train_index = index
        if index.problems:
            log.warning(
                "data: %d file(s) of %s refused while indexing%s",
                len(index.problems),
                self.path,
                problem_summary(index.problems),
            )

    def _index(self, path: str) -> FolderIndex:
        index = check_files(index_folder(path, self.caption_column), bool(self.buckets), self.max_pixels)
        return assign_buckets(index, self.buckets, self.no_upscale) if self.buckets else index

    def batches_per_epoch(self, world_size: int) -> int | None:
        """Training batches per rank and epoch: every rank the same (``ldm.data.folder.epoch_plan``)."""
        if self.train_index is None:
            raise FolderError("batches_per_epoch() before setup(): the folder is not indexed")
        return self._stream(True).batches_per_rank(world_size)

    def data_digest(self) -> str:
        """A short hash of the indexed images (paths and buckets) and ``repeats``: the epoch plan's input."""
        digest = hashlib.sha256(f"{self.repeats}\0{len(self.train_index)}\0".encode())
        digest.update("\0".join(self.train_index.paths).encode())
        digest.update(self.train_index.bucket_of().tobytes())
        return digest.hexdigest()[:16]

    def train_stream(self) -> FolderStream:
        if self.train_index is None:
            raise FolderError("train_dataloader() before setup(): the folder is not indexed")
        return self._stream(True)

    def _stream(self, train: bool) -> FolderStream:
        rank, world_size = self._place()
        if train:
            return FolderStream(
                self.train_index,
                self.train_sample,
                self.batch_size,
                train=True,
                seed=self.seed,
                repeats=self.repeats,
                rank=rank,
                world_size=world_size,
            )
        return FolderStream(
            self.val_index,
            self.val_sample,
            self.val_batch_size,
            train=False,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_index is None or not len(self.val_index):
            return []
        return self.val_loader(self._loader(self._stream(False), self.num_workers))
