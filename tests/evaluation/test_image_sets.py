"""Image sets: folders (metadata.jsonl aware) and webdataset shards read as the same uint8 batches,
split across ranks, and rebatched from numpy or torch."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.evaluation.image_sets import ImageSet, folder_images, rebatch


def test_rebatch_accepts_numpy_and_torch_and_splits_at_size_changes() -> None:
    small = np.zeros((3, 8, 8, 3), np.uint8)  # (B, H, W, 3) numpy
    large = torch.zeros(4, 3, 9, 9, dtype=torch.uint8)  # (B, 3, H, W) torch
    shapes = [tuple(batch.shape) for batch in rebatch([small, small, large], batch_size=4)]
    assert shapes == [(4, 3, 8, 8), (2, 3, 8, 8), (4, 3, 9, 9)]
    with pytest.raises(TypeError, match="uint8"):
        list(rebatch([torch.zeros(1, 3, 8, 8)], 4))
    with pytest.raises(ValueError, match="B, H, W, 3"):
        list(rebatch([np.zeros((1, 3, 8, 8), np.uint8)], 4))


def _images(n: int, seed: int, size: tuple[int, int] = (16, 24)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _write_folder(folder: Path, images: list[np.ndarray], metadata: bool) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    if metadata:
        Image.fromarray(images[0]).save(folder / "grid.png")  # a preview, not a sample
        rows = [{"file": f"{i:03d}.png", "prompt": "p"} for i in range(len(images))]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_shard(path: Path, images: list[np.ndarray]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            for name, data in ((f"{i:03d}.png", _png(image)), (f"{i:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folders_and_shards_read_the_same_images_and_ranks_split_them(tmp_path: Path) -> None:
    samples, reference = _images(9, seed=0), _images(7, seed=1, size=(20, 20))
    _write_folder(tmp_path / "samples", samples, metadata=True)
    _write_folder(tmp_path / "reference", reference, metadata=False)
    _write_shard(tmp_path / "ref-000.tar", reference[:4])
    _write_shard(tmp_path / "ref-001.tar", reference[4:])

    folder_set = ImageSet(str(tmp_path / "samples"), batch_size=4)
    assert folder_set.count() == 9  # metadata.jsonl lists the samples, grid.png is left out
    assert [len(batch) for batch in folder_set] == [4, 4, 1]
    stacked = np.concatenate(list(folder_set))
    assert stacked.shape == (9, 16, 24, 3) and np.array_equal(stacked, np.stack(samples))
    from_folder = np.concatenate(list(ImageSet(str(tmp_path / "reference"))))
    from_shards = np.concatenate(list(ImageSet(str(tmp_path / "ref-{000..001}.tar"), 3)))
    assert np.array_equal(from_folder, np.stack(reference)) and np.array_equal(from_shards, from_folder)
    assert ImageSet(str(tmp_path / "ref-*.tar")).count() is None  # known only once read
    # ranks split a set: r, r + W, ...
    halves = [np.concatenate(list(ImageSet(str(tmp_path / "ref-*.tar"), 2, rank, 2))) for rank in (0, 1)]
    assert np.array_equal(halves[0], np.stack(reference[0::2])) and np.array_equal(halves[1], np.stack(reference[1::2]))
    assert ImageSet(str(tmp_path / "samples"), rank=1, world_size=2).count() == 4


def test_a_folder_without_images_or_with_missing_listed_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in"):
        folder_images(tmp_path / "empty")
    _write_folder(tmp_path / "samples", _images(2, seed=0), metadata=True)
    (tmp_path / "samples" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image"):
        folder_images(tmp_path / "samples")
    with pytest.raises(NotADirectoryError):
        folder_images(tmp_path / "absent")
