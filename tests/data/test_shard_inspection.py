"""Tests for shard inspection: exact counts, statistics and bad-sample reasons on a crafted corpus,
truncated shards, the contact sheet, and the CLI."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data.contact_sheet import SheetLayout, wrap_text
from ldm.data.corpus_inputs import folder_items
from ldm.data.inspection_text import format_report
from ldm.data.shard_inspection import inspect_shards, save_contact_sheet
from ldm.data.shard_writing import write_shards
from ldm_testing import run_script


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    with open(path, "wb") as file, wds.TarWriter(file, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def member_end(path: Path, name: str) -> tuple[int, int]:
    """(offset of the member's data, offset just past its padded data) in a tar."""
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
    return info.offset_data, info.offset_data + -(-info.size // 512) * 512


def meta(width: int, height: int) -> bytes:
    return json.dumps({"width": width, "height": height}).encode()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """Four shards: 4 good samples; 6 bad ones; 3 samples cut inside the third; 2 samples whose
    end-of-archive blocks are missing (the loader keeps the first: the second may lack members)."""
    root = tmp_path_factory.mktemp("shards")
    jpg, png = (lambda w, h: image_bytes(w, h, "JPEG")), image_bytes
    write_tar(
        root / "a-000000.tar",
        [
            {"__key__": "k0", "jpg": jpg(40, 20), "txt": b"a red cat", "json": meta(40, 20)},
            {"__key__": "k1", "png": png(30, 30), "txt": b"dog", "json": meta(30, 30)},
            {"__key__": "k2", "jpg": jpg(20, 40), "txt": b"  two  words ", "json": meta(20, 40)},
            {"__key__": "k3", "png": png(50, 25), "txt": b"one two three four"},  # size from the header
        ],
    )
    write_tar(
        root / "a-000001.tar",
        [
            {"__key__": "b0", "jpg": jpg(40, 20), "json": meta(40, 20)},  # no caption
            {"__key__": "b1", "jpg": b"not an image", "txt": b"broken", "json": meta(10, 10)},  # corrupt image
            {"__key__": "b2", "png": png(16, 16), "txt": b"", "cls": b""},  # an empty caption, an empty member
            {"__key__": "b3", "txt": b"orphan caption"},  # no image
            {"__key__": "b4", "jpg": b"", "txt": b"empty image"},  # a zero-byte image
            {"__key__": "b5", "jpg": jpg(40, 20), "txt": b"\xff\xfe bad", "json": b"{"},  # caption, json
        ],
    )
    cut = root / "a-000002.tar"
    write_tar(cut, [{"__key__": f"c{i}", "png": png(10, 10, seed=i), "txt": b"x"} for i in range(3)])
    data, _ = member_end(cut, "c2.png")
    os.truncate(cut, data + 5)  # inside the third sample's image
    ended = root / "a-000003.tar"
    write_tar(ended, [{"__key__": f"d{i}", "png": png(10, 10, seed=i), "txt": b"x"} for i in range(2)])
    os.truncate(ended, member_end(ended, "d1.txt")[1])  # between members: no end-of-archive blocks
    return sorted(str(p) for p in root.glob("*.tar"))


def test_counts_statistics_and_bad_samples_are_exact(corpus: list[str]) -> None:
    report = inspect_shards(corpus, progress=False)
    assert (report.num_shards, report.num_samples) == (4, 4 + 6 + 2 + 1)
    assert report.total_bytes == sum(os.path.getsize(url) for url in corpus)
    assert report.shard_bytes["count"] == 4 and report.shard_bytes["max"] == max(map(os.path.getsize, corpus))
    assert report.sample_bytes["count"] == 13 and report.sample_bytes["min"] == 11  # b4: 0 + len("empty image")

    assert report.bad_samples == 6
    assert report.bad_by_reason == {  # the loader's names (ldm.data.skips); samples, then shards
        "corrupt_caption": 1,
        "corrupt_image": 1,
        "corrupt_metadata": 1,
        "empty_caption": 2,
        "empty_image": 1,
        "empty_member": 1,
        "no_image": 1,
        "truncated_shard": 2,
    }
    assert list(report.bad_by_reason)[-1] == "truncated_shard"
    assert {(e["key"], e["reason"]) for e in report.bad_examples} >= {
        ("b2", "empty_caption"),
        ("b2", "empty_member"),
        ("b4", "empty_image"),
        ("b5", "corrupt_caption"),
    }
    assert [(s["shard"], s["reason"]) for s in report.bad_shards] == [(url, "truncated_shard") for url in corpus[2:]]
    assert "end-of-archive" in report.bad_shards[1]["detail"]

    # captions: 9 3 10 18 | 6 0 14 11 | 1 1 | 1 (stripped; b0 has none, b5's is not UTF-8)
    assert report.caption_chars == pytest.approx(
        {"count": 11, "min": 0, "median": 6, "p95": 16, "max": 18, "mean": 74 / 11}
    )
    assert report.caption_words == pytest.approx(
        {"count": 11, "min": 0, "median": 1, "p95": 3.5, "max": 4, "mean": 18 / 11}
    )
    # resolution: .json for k0 k1 k2 b0 b1; the header for k3 b2 b5 and the three 10x10 PNGs
    assert report.resolution_source == {"header": 6, "json": 5}
    assert report.image_formats == {"jpg": 6, "png": 6}
    assert {k: report.width[k] for k in ("count", "min", "median", "p95", "max")} == pytest.approx(
        {"count": 11, "min": 10, "median": 20, "p95": 45, "max": 50}
    )
    assert {k: report.height[k] for k in ("min", "median", "p95", "max")} == pytest.approx(
        {"min": 10, "median": 20, "p95": 35, "max": 40}
    )
    assert {k: report.aspect[k] for k in ("min", "median", "max")} == pytest.approx({"min": 0.5, "median": 1, "max": 2})

    text = format_report(report)
    assert "samples 13" in text and "bad samples     6 of 13" in text and "2 truncated_shard" in text
    json.dumps(report.to_dict())  # JSON-ready


def test_header_only_mode_and_workers_agree(corpus: list[str]) -> None:
    full = inspect_shards(corpus, progress=False).to_dict()
    assert inspect_shards(corpus, workers=2, progress=False).to_dict() == full
    headers = inspect_shards(corpus, decode=False, progress=False)
    # garbage fails even the header; an empty file is empty whatever the mode
    assert (headers.bad_by_reason["corrupt_image"], headers.bad_by_reason["empty_image"]) == (1, 1)


def test_contact_sheet(corpus: list[str], tmp_path: Path) -> None:
    layout = SheetLayout(thumb=48, columns=4, caption_lines=3)
    report = inspect_shards(corpus, sheet_samples=6, seed=1, layout=layout, progress=False)
    keys = [c.key for c in report.sheet]
    assert len(keys) == 6 and len(set((c.shard, c.key) for c in report.sheet)) == 6
    assert not {"b1", "b3", "b4"} & set(keys)  # only readable images
    assert keys == [c.key for c in inspect_shards(corpus, sheet_samples=6, seed=1, layout=layout, progress=False).sheet]
    assert keys != [c.key for c in inspect_shards(corpus, sheet_samples=6, seed=2, layout=layout, progress=False).sheet]

    path = save_contact_sheet(report, tmp_path / "sheet.png", layout)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.size == layout.size(6)
    width, height = layout.size(6)
    assert width == 8 + 4 * (48 + 8) and height == 8 + 2 * (48 + 2 + 3 * layout.line_height + 8)


def test_wrap_text_fits_and_cuts() -> None:
    font = SheetLayout().font
    lines = wrap_text("a fairly long caption " * 10 + "x" * 80, font, width=100, max_lines=4)
    assert len(lines) == 4 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 100 for line in lines)
    assert wrap_text("short", font, 100, 4) == ["short"]
    assert all(font.getlength(line) <= 60 for line in wrap_text("y" * 50, font, 60, 10))


def test_cli(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(6):
        (images / f"{index}.png").write_bytes(image_bytes(20 + index, 16, seed=index))
        (images / f"{index}.txt").write_text(f"caption {index}")
    write_shards(folder_items(images), tmp_path / "shards", samples_per_shard=4, progress=False)
    status = run_script(
        "data_scripts/inspect_shards.py",
        str(tmp_path / "shards" / "shard-{000000..000001}.tar"),
        "--json",
        str(tmp_path / "report.json"),
        "--contact-sheet",
        str(tmp_path / "sheet.png"),
        "--samples",
        "5",
        "--thumb",
        "32",
        "--no-progress",
    )
    result = capsys.readouterr()
    assert status == 0, result.err
    assert "shards   2   samples 6" in result.out and "bad samples     0 of 6" in result.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_samples"] == 6 and len(report["sheet"]) == 5
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == SheetLayout(thumb=32).size(5)
