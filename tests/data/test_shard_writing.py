"""Tests for image corpora -> webdataset shards: inputs, encoding rules, skips, determinism, atomicity."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data.corpus_inputs import folder_items, table_items
from ldm.data.sample_encoding import encode_image
from ldm.data.shard_writing import write_shards
from ldm.errors import UserError
from ldm_testing import run_script

SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """A small random image encoded as ``fmt``."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def read_shards(directory: Path, prefix: str = "shard") -> list[dict]:
    """Every sample of ``directory/{prefix}-*.tar`` as webdataset decodes it, in order."""
    urls = sorted(str(p) for p in directory.glob(f"{prefix}-*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).decode("pil")
    return list(dataset)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """24 captioned images (5 formats, one in a subfolder), a corrupt JPEG, an uncaptioned PNG,
    and an image in a hidden folder (ignored)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    formats = ["JPEG", "PNG", "WEBP", "BMP", "TIFF"]
    for index in range(24):
        fmt = formats[index % len(formats)]
        stem = root / ("sub" if index == 7 else "") / f"img{index:02d}"
        stem.with_suffix(SUFFIX[fmt]).write_bytes(image_bytes(16 + index, 12, fmt, seed=index))
        stem.with_suffix(".txt").write_text(f"  caption number {index}\n")
    (root / "corrupt.jpg").write_bytes(image_bytes(20, 20, "JPEG")[:60])
    (root / "corrupt.txt").write_text("a corrupt image")
    (root / "uncaptioned.png").write_bytes(image_bytes(8, 8))
    (root / ".cache" / "hidden.png").write_bytes(image_bytes(8, 8))
    (root / ".cache" / "hidden.txt").write_text("hidden")
    return root


def test_folder_to_shards(corpus: Path, tmp_path: Path) -> None:
    items = folder_items(corpus)
    assert len(items) == 26 and items[0].source == "corrupt.jpg" and items[-1].source == "uncaptioned.png"
    out = tmp_path / "out"
    summary = write_shards(items, out, samples_per_shard=10, progress=False)

    assert (summary.num_inputs, summary.num_samples) == (26, 24)
    assert dict(summary.skipped) == {"corrupt_image": 1, "empty_caption": 1}
    assert [s.name for s in summary.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.num_samples for s in summary.shards] == [10, 10, 4]
    assert sorted(p.name for p in out.iterdir()) == [s.name for s in summary.shards] + ["shard.manifest.json"]
    manifest = json.loads((out / "shard.manifest.json").read_text())
    assert manifest["num_samples"] == 24 and manifest["skipped"] == {"corrupt_image": 1, "empty_caption": 1}
    assert "skipped 2 of 26 inputs: 1 corrupt_image, 1 empty_caption" in summary.line()

    samples = read_shards(out)
    by_source = {item.source: item for item in items}
    assert len(samples) == 24
    for sample in samples:
        image_keys = {"jpg", "png", "webp"} & set(sample)
        assert (
            len(image_keys) == 1 and set(sample) == {"__key__", "__url__", "__local_path__", "txt", "json"} | image_keys
        )
        image, meta = sample[image_keys.pop()], sample["json"]
        item = by_source[meta["source"]]
        assert sample["__key__"] == f"{item.index:09d}"
        index = int(Path(meta["source"]).stem[3:])
        assert sample["txt"] == f"caption number {index}"  # stripped
        assert image.size == (meta["width"], meta["height"]) == (16 + index, 12)
        assert (meta["original_width"], meta["original_height"]) == image.size
    assert {s["json"]["source"] for s in samples} >= {"sub/img07.webp"}


def test_training_pipeline_reads_the_shards(corpus: Path, tmp_path: Path) -> None:
    from ldm.data.transforms import ImageTransform
    from ldm.data.webdataset import image_caption_pipeline

    summary = write_shards(folder_items(corpus), tmp_path / "out", samples_per_shard=10, progress=False)
    urls = [str(tmp_path / "out" / shard.name) for shard in summary.shards]
    batches = list(image_caption_pipeline(urls, ImageTransform(8), batch_size=8, train=False))
    assert [tuple(b["image"].shape) for b in batches] == [(8, 3, 8, 8)] * 3
    assert sorted(c for b in batches for c in b["caption"]) == sorted(f"caption number {i}" for i in range(24))


def test_encoding_rules(corpus: Path, tmp_path: Path) -> None:
    """JPEG/PNG/WebP are stored byte for byte; BMP and TIFF become JPEG; the sniffed format wins."""
    (corpus / "misnamed.jpg").write_bytes(image_bytes(10, 10, "PNG"))
    (corpus / "misnamed.txt").write_text("a png named .jpg")
    write_shards(folder_items(corpus), tmp_path / "out", samples_per_shard=100, progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    by_source = {
        json.loads(data)["source"]: name.split(".")[0] for name, data in members.items() if name.endswith(".json")
    }
    for source, key in by_source.items():
        original = (corpus / source).read_bytes()
        if source == "misnamed.jpg":
            assert members[f"{key}.png"] == original
        elif source.endswith((".jpg", ".png", ".webp")):
            assert members[f"{key}.{Path(source).suffix[1:]}"] == original
        else:
            assert Image.open(io.BytesIO(members[f"{key}.jpg"])).format == "JPEG"


def test_max_side_exif_and_transparency() -> None:
    large = encode_image(image_bytes(300, 120, "PNG"), max_side=100)
    assert (large.extension, large.width, large.height) == ("jpg", 100, 40)
    assert (large.original_width, large.original_height) == (300, 120)
    small = image_bytes(30, 20, "JPEG")
    assert encode_image(small, max_side=100).data == small  # within the limit: untouched

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = encode_image(image_bytes(30, 20, "JPEG", exif=exif.tobytes()))
    assert (rotated.extension, rotated.width, rotated.height) == ("jpg", 20, 30)
    assert (rotated.original_width, rotated.original_height) == (20, 30)

    clear = io.BytesIO()
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(clear, format="PNG")
    flattened = Image.open(io.BytesIO(encode_image(clear.getvalue(), max_side=20).data))
    assert flattened.mode == "RGB" and np.asarray(flattened).min() >= 250  # transparent -> white


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_table_inputs(tmp_path: Path, suffix: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        (images / f"{index}.png").write_bytes(image_bytes(10 + index, 10, seed=index))
    rows = [
        {"path": "images/0.png", "caption": "zero", "score": "0.5", "width": "999"},
        {"path": "images/missing.png", "caption": "gone", "score": "0.1", "width": "1"},
        {"path": "images/1.png", "caption": "one, with a comma", "score": "0.7", "width": "2"},
        {"path": "images/2.png", "caption": None, "score": "0.9", "width": "3"},
    ]
    table = tmp_path / f"table{suffix}"
    if suffix == ".csv":
        import csv

        rows[3]["caption"] = ""  # CSV has no null: an empty caption, kept
        with open(table, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        table.write_text("".join(json.dumps(row) + "\n" for row in rows))

    summary = write_shards(table_items(table), tmp_path / "out", samples_per_shard=2, progress=False)
    samples = read_shards(tmp_path / "out")
    expected_keys = ["000000000", "000000002", "000000003"] if suffix == ".csv" else ["000000000", "000000002"]
    assert [s["__key__"] for s in samples] == expected_keys
    assert summary.skipped["missing_file"] == 1
    assert summary.skipped["empty_caption"] == (0 if suffix == ".csv" else 1)
    first = samples[0]["json"]
    assert first == {
        "source": "images/0.png",
        "width": 10,
        "height": 10,
        "original_width": 10,
        "original_height": 10,
        "score": "0.5",
        "table_width": "999",
    }
    assert samples[1]["txt"] == "one, with a comma"
    if suffix == ".csv":  # a CSV header must name both columns
        with pytest.raises(UserError, match="'text'"):
            list(table_items(table, caption_column="text"))


def test_same_input_same_bytes_whatever_the_workers(corpus: Path, tmp_path: Path) -> None:
    items = folder_items(corpus)
    write_shards(items, tmp_path / "one", samples_per_shard=7, max_side=20, workers=1, progress=False)
    write_shards(items, tmp_path / "two", samples_per_shard=7, max_side=20, workers=2, progress=False)
    shards = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(shards) == 4
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in shards)


def test_interrupted_run_leaves_only_complete_shards(corpus: Path, tmp_path: Path) -> None:
    items = folder_items(corpus)

    def interrupted():
        yield from items[:8]
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(interrupted(), out, samples_per_shard=5, progress=False)
    assert sorted(os.listdir(out)) == ["shard-000000.tar"]  # no partial file, no manifest
    assert len(read_shards(out)) == 5


def test_existing_shards_need_overwrite(corpus: Path, tmp_path: Path) -> None:
    items = folder_items(corpus)
    out = tmp_path / "out"
    write_shards(items, out, samples_per_shard=5, progress=False)
    assert len(list(out.glob("*.tar"))) == 5
    with pytest.raises(UserError, match="--overwrite"):
        write_shards(items, out, samples_per_shard=5, progress=False)
    write_shards(items[:4], out, samples_per_shard=5, overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "shard.manifest.json"]  # extra shards removed
    write_shards(items, out, prefix="val", samples_per_shard=100, progress=False)  # another prefix is fine
    assert (out / "val-000000.tar").exists()


def test_cli(corpus: Path, tmp_path: Path, capsys) -> None:
    status = run_script(
        "data_scripts/images_to_shards.py",
        str(corpus),
        "--out",
        str(tmp_path / "out"),
        "--samples-per-shard",
        "10",
        "--prefix",
        "train",
        "--max-side",
        "16",
        "--workers",
        "2",
        "--no-progress",
    )
    result = capsys.readouterr()
    assert status == 0, result.err
    assert "wrote 24 samples in 3 shard(s)" in result.out
    assert "skipped 2 of 26 inputs: 1 corrupt_image, 1 empty_caption" in result.out
    assert "corrupt.jpg: corrupt_image" in result.err
    samples = read_shards(tmp_path / "out", "train")
    assert len(samples) == 24 and max(max(s.get("jpg", s.get("png", s.get("webp"))).size) for s in samples) == 16
