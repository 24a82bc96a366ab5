"""data=folder: the two caption conventions, hostile metadata paths, bad images skipped and counted,
buckets, repeats, the validation split, equal batches per rank and a bit-identical resume."""

import csv
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.buckets import BucketedSample
from ldm.data.captions import CaptionPicker
from ldm.data.folder import FolderError, FolderStream, assign_buckets, check_files, index_folder, split_validation
from ldm.data.folder_datamodule import FolderDataModule
from ldm.data.samples import ToTrainingSample
from ldm.data.streams import StreamStart
from ldm.data.training_loader import TrainingLoader
from ldm.data.transforms import ImageTransform
from ldm_testing import compose_config

BUCKETS = [(24, 48), (32, 32), (48, 24)]  # auto_buckets(32, step=8, max_ratio=2) without the 1.67 ones
SIZES = {"wide": (64, 32), "square": (40, 40), "tall": (30, 60)}
SHAPE = {"wide": (3, 24, 48), "square": (3, 32, 32), "tall": (3, 48, 24)}


def _image(path: Path, size, colour, fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _kind(key: str) -> str:
    """ "b/c/wide-3.jpg" -> "wide" (keys are the image paths relative to the folder)."""
    return Path(key).stem.split("-")[0]


@pytest.fixture(scope="module")
def txt_folder(tmp_path_factory) -> Path:
    """13 images in two subfolders, .jpg/.png/.webp, each with x.txt: 6 wide, 4 square, 3 tall; and
    one without a caption and one corrupt, both to be skipped."""
    root = tmp_path_factory.mktemp("txt")
    counts = {"wide": 6, "square": 4, "tall": 3}
    n = 0
    for kind, count in counts.items():
        for j in range(count):
            ext = ("jpg", "png", "webp")[n % 3]
            path = root / ("a" if n % 2 else "b/c") / f"{kind}-{j}.{ext}"
            _image(path, SIZES[kind], (n * 17 % 256, 40, 200))
            path.with_suffix(".txt").write_text(f"a photo of {kind} {j}\n")
            n += 1
    _image(root / "uncaptioned.png", (40, 40), (1, 2, 3))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "broken.txt").write_text("a broken image")
    (root / "notes.md").write_text("not an image")
    return root


def _samples(buckets=None, **options):
    if buckets:
        return BucketedSample(buckets, CaptionPicker(["txt", "json.caption"]), uint8=True, **options)
    return ToTrainingSample(ImageTransform(32, uint8=True), CaptionPicker(["txt", "json.caption"]))


def _index(root, buckets=None):
    index = check_files(index_folder(root), bool(buckets), None)
    return assign_buckets(index, buckets, False) if buckets else index


def _stream(index, buckets=None, batch_size=4, **options):
    return FolderStream(index, _samples(buckets), batch_size, train=True, seed=5, **options)


def test_txt_captions_from_the_real_config(txt_folder):
    cfg = compose_config(
        "train",
        [
            "data=folder",
            f"data.path={txt_folder}",
            "data.image_size=32",
            "data.num_workers=0",
            "data.batch_size=4",
            "seed=3",
        ],
    )
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    assert len(datamodule.train_index) == 15  # 13 + uncaptioned + broken (found by decoding)
    batches = list(datamodule.train_dataloader())
    assert len(batches) == datamodule.batches_per_epoch(1) == 4  # ceil(15 / 4): the last one filled up
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
        for key, caption in zip(batch["key"], batch["caption"]):
            kind, j = _kind(key), Path(key).stem.rsplit("-", 1)[-1]
            assert caption == f"a photo of {kind} {j}"
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    assert skipped["skipped/corrupt_image"] >= 1 and skipped["skipped/empty_caption"] >= 1
    keys = {k for b in batches for k in b["key"]}
    assert len(keys) == 13  # every good image, each epoch (failed ones replaced by others of their bucket)


def _metadata_folder(root: Path, kind: str) -> Path:
    rows = [{"file_name": f"img/{i}.png", "text": f"caption {i}"} for i in range(6)]
    for i in range(6):
        _image(root / f"img/{i}.png", (40, 40), (i * 40, 0, 0))
    rows += [
        {"file_name": "../outside.png", "text": "escape"},
        {"file_name": str(root.parent / "outside.png"), "text": "absolute"},
        {"file_name": "img/missing.png", "text": "gone"},
        {"text": "no file"},
    ]
    _image(root.parent / "outside.png", (40, 40), (0, 0, 0))
    (root / "img/link.png").symlink_to(root.parent / "outside.png")
    rows.append({"file_name": "img/link.png", "text": "a symlink out"})
    (root / "img/5.txt").write_text("ignored: the metadata decides")
    if kind == "jsonl":
        rows[0] = {"file_name": "img/0.png", "caption": ["first", "second"]}  # a list: one drawn per use
        lines = [json.dumps(row) for row in rows] + ["{not json"]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    else:
        with open(root / "metadata.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, ["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_captions_and_hostile_paths(tmp_path, kind):
    root = _metadata_folder(tmp_path / "set", kind)
    index = _index(root)
    assert index.paths == [f"img/{i}.png" for i in range(6)]  # only the listed images inside the folder
    reasons = Counter(reason for reason, _, _ in index.problems)
    assert reasons["unsafe_path"] == 3  # ../, an absolute path, a symlink out
    assert reasons["missing_file"] == 1
    assert reasons["corrupt_metadata"] == (2 if kind == "jsonl" else 1)  # no file_name (+ a line not JSON)

    batches = list(_stream(index, batch_size=3))
    assert len(batches) == 2
    captions = dict(zip(*[sum((b[k] for b in batches), []) for k in ("key", "caption")]))
    assert captions["img/5.png"] == "caption 5"
    assert captions["img/0.png"] == ("caption 0" if kind == "csv" else captions["img/0.png"])
    if kind == "jsonl":
        assert captions["img/0.png"] in ("first", "second")
    counted = Counter()
    for batch in batches:
        counted.update(batch["skipped"])
    assert counted["skipped/unsafe_path"] == 3 and counted["skipped/missing_file"] == 1  # once per epoch


def test_missing_and_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FolderError, match="not a folder"):
        index_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    datamodule = FolderDataModule(path=str(tmp_path / "empty"), image_size=32, num_workers=0)
    with pytest.raises(FolderError, match="no usable image"):
        datamodule.setup("fit")
    with pytest.raises(FolderError, match="not both"):
        FolderDataModule(path=str(tmp_path), val_path=str(tmp_path), val_fraction=0.1)


def test_buckets_put_each_image_in_its_aspect_ratio_and_each_batch_in_one_shape(txt_folder):
    index = _index(txt_folder, BUCKETS)
    assert ("corrupt_image", "broken.jpg") in [(r, w) for r, w, _ in index.problems]  # found in the header
    for path, bucket in zip(index.paths, index.buckets):
        kind = _kind(path) if "-" in path else "square"
        assert BUCKETS[bucket] == SHAPE[kind][:0:-1]  # (w, h)
    batches = list(_stream(index, BUCKETS, batch_size=2))
    assert len(batches) == 8  # per bucket, rounded up: wide 6 -> 3, square 4 + uncaptioned -> 3, tall 3 -> 2
    for batch in batches:
        assert {SHAPE[_kind(k)] for k in batch["key"] if "-" in k} <= {tuple(batch["image"].shape[1:])}
        assert batch["image"].shape[0] == 2


def test_two_ranks_get_equal_batch_counts_and_together_every_image(txt_folder):
    index = _index(txt_folder, BUCKETS)
    # batches of 3: wide 2, square 2, tall 1 = 5, padded to 6 (a whole batch repeated): 3 per rank
    per_rank = [list(_stream(index, BUCKETS, batch_size=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [3, 3] == [_stream(index, BUCKETS, 3).batches_per_rank(2)] * 2
    keys = {k for batches in per_rank for b in batches for k in b["key"]}
    assert keys == {p for p in index.paths if "uncaptioned" not in p}
    skipped = [sum((Counter(b["skipped"]) for b in batches), Counter()) for batches in per_rank]
    assert skipped[0]["skipped/corrupt_image"] == 1 and skipped[1]["skipped/corrupt_image"] == 0  # rank 0 counts


def test_repeats_and_epochs(txt_folder):
    index = _index(txt_folder)
    once = _stream(index, repeats=1)
    thrice = _stream(index, repeats=3)
    assert thrice.batches_per_rank(1) == 12 and once.batches_per_rank(1) == 4  # 45 / 4 and 15 / 4, rounded up
    seen = Counter(k for b in thrice for k in b["key"])
    assert min(seen.values()) >= 3 and sum(seen.values()) == 48
    second = _stream(index)
    second.start = StreamStart(epoch=1)
    assert [b["key"] for b in once] != [b["key"] for b in second]  # each epoch its own order


def test_validation_split_is_deterministic_and_disjoint(txt_folder):
    index = _index(txt_folder)
    train, val = split_validation(index, 0.2)
    assert len(val) == 3 and len(train) == 12 and not set(train.paths) & set(val.paths)
    assert split_validation(index, 0.2)[1].paths == val.paths
    datamodule = FolderDataModule(
        path=str(txt_folder), val_fraction=0.2, image_size=32, batch_size=2, num_workers=0, seed=1
    )
    datamodule.setup("fit")
    seen = [k for batch in datamodule.val_dataloader() for k in batch["key"]]
    assert sorted(seen) == sorted(p for p in val.paths if "uncaptioned" not in p and "broken" not in p)


class CountingSample:
    """A to_sample that counts its calls (decodes), to show a resume decodes nothing it skips."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __call__(self, raw, rng):
        self.calls += 1
        return self.inner(raw, rng)


@pytest.mark.parametrize("buckets", [None, BUCKETS], ids=["square", "buckets"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_deep_into_an_epoch_is_bit_identical_and_decodes_nothing_skipped(txt_folder, buckets, workers):
    index = _index(txt_folder, buckets)

    def batches(epoch, skip, to_sample=None):
        stream = FolderStream(
            index,
            to_sample or _samples(buckets, random_flip=True) if buckets else to_sample or _samples(None),
            2,
            train=True,
            seed=9,
            repeats=2,
        )
        loader = TrainingLoader(
            stream, lambda s: DataLoader(s, batch_size=None, num_workers=workers), workers, lambda: (epoch, skip)
        )
        return list(loader)

    straight = batches(1, 0)
    assert len(straight) >= 12
    resumed = batches(1, 7)
    assert len(resumed) == len(straight) - 7
    for a, b in zip(straight[7:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    if workers == 0:  # (a worker's calls are not seen from here)
        counting = CountingSample(_samples(buckets) if buckets else _samples(None))
        stream = FolderStream(index, counting, 2, train=True, seed=9, repeats=2)
        stream.start = StreamStart(1, 7)
        list(itertools.islice(iter(stream), 1))
        assert counting.calls <= 3  # the first batch after the skipped 7 (+ a replacement), nothing before


@pytest.mark.slow
def test_training_from_a_folder_with_buckets_resumes_bit_identically(txt_folder, tmp_path):
    """Stopped at step 10 of a 14-batch epoch, resumed, through the epoch's end to step 16 (no
    validation: see the report on validation at the checkpoint's step)."""
    from omegaconf import open_dict

    from ldm.checkpoints import load_training_checkpoint
    from ldm_testing import TINY_MODEL, TINY_TRAINING
    from train import train

    def run(out, *extra):
        training = [o for o in TINY_TRAINING if not o.startswith(("data.", "callbacks.sample_grid"))]
        cfg = compose_config(
            "train",
            [
                *TINY_MODEL,
                *training,
                "data=folder",
                f"data.path={txt_folder}",
                "data.image_size=32",
                "data.batch_size=2",
                "data.num_workers=2",
                "data.buckets=auto",
                "data.bucket_step=8",
                "data.repeats=2",
                "~callbacks.sample_grid",
                "trainer.max_steps=16",
                "trainer.limit_val_batches=0",
                "callbacks.checkpoint.every_n_train_steps=5",
                *extra,
            ],
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        return train(cfg)

    from ldm.data.buckets import auto_buckets

    buckets = auto_buckets(32, 8)
    assert 10 < _stream(_index(txt_folder, buckets), buckets, batch_size=2, repeats=2).batches_per_rank(1) < 16
    straight = run(tmp_path / "straight")
    run(tmp_path / "cut", "+callbacks.stop._target_=ldm_testing.StopAfterStep", "+callbacks.stop.step=10")
    middle = tmp_path / "cut" / "checkpoints" / "step_0000010.ckpt"
    resumed = run(tmp_path / "cut", f"resume={middle}")["task"]
    for name, value in straight["task"].state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert load_training_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")["global_step"] == 16
