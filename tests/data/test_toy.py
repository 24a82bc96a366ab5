"""Tests for the toy text-to-image generator: the frozen spec, shard layout and atomic writing."""

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import toy
from ldm.data.toy import (
    COLOURS,
    POSITIONS,
    SHAPES,
    ToySpec,
    all_prompts,
    caption,
    ensure_toy_shards,
    render,
    sample_spec,
    write_toy_shards,
)
from ldm_testing import run_script

CAPTION_RE = re.compile(
    r"^a (red|green|blue|yellow|purple|orange|white) (circle|square|triangle) "
    r"in the (top left|top right|bottom left|bottom right|center)$"
)


@pytest.fixture(scope="module")
def specs() -> list[ToySpec]:
    """A few thousand specs from one seed: enough to hit every range end."""
    rng = np.random.default_rng(1234)
    return [sample_spec(rng) for _ in range(3000)]


def _read_tar(path: Path) -> dict[str, bytes]:
    """Member name -> bytes of one tar, in archive order."""
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    """File name -> bytes for every file in `directory`."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_toy_shards(tmp_path / name, 25, 5, seed=seed, samples_per_shard=10, progress=False)
    first, second, other = (_tree_bytes(tmp_path / name) for name in "abc")
    assert first == second
    assert first["train-000000.tar"] != other["train-000000.tar"]


def test_render_size_mode_and_pixels(specs: list[ToySpec]) -> None:
    for spec in specs[:300]:
        image = render(spec)
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image)
        x0, y0, x1, y1 = toy.bounding_box(spec)
        assert x1 - x0 + 1 == spec.size
        assert (x0 + x1 + 1) / 2 - spec.centre_x in (0, 0.5)
        shape = np.any(pixels != spec.background, axis=2)
        ys, xs = np.nonzero(shape)
        # The shape fills exactly its bounding box (clipped to the image) and has one colour.
        clipped = (max(x0, 0), max(y0, 0), min(x1, 63), min(y1, 63))
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == clipped
        assert np.all(pixels[shape] == spec.rgb)
        assert np.all(pixels[~shape] == spec.background)
        if spec.shape == "triangle":  # points up: a narrow apex row, a full-width base
            assert shape[max(y0, 0)].sum() <= 2 and shape[y1].sum() >= spec.size - 1


def test_caption_grammar(specs: list[ToySpec]) -> None:
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 105
    assert all(CAPTION_RE.match(prompt) for prompt in prompts)
    assert caption(specs[0]) == f"a {specs[0].colour} {specs[0].shape} in the {specs[0].position}"
    assert {caption(spec) for spec in specs} <= set(prompts)
    example = ToySpec("white", "triangle", "center", 32, 32, 20, (235, 235, 235), 30)
    assert caption(example) == "a white triangle in the center"


def test_attribute_ranges(specs: list[ToySpec]) -> None:
    assert {spec.background for spec in specs} == set(range(20, 51))
    assert {spec.size for spec in specs} == set(range(16, 27))
    assert {spec.colour for spec in specs} == set(COLOURS)
    assert {spec.shape for spec in specs} == set(SHAPES)
    assert {spec.position for spec in specs} == set(POSITIONS)
    centres = np.array([(spec.centre_x, spec.centre_y) for spec in specs])
    offsets = centres - np.array([POSITIONS[spec.position] for spec in specs])
    assert set(offsets[:, 0]) == set(offsets[:, 1]) == set(range(-4, 5))
    jitters = np.array([np.subtract(spec.rgb, COLOURS[spec.colour]) for spec in specs])
    assert jitters.min() == -15 and jitters.max() <= 15
    assert all(0 <= channel <= 255 for spec in specs for channel in spec.rgb)
    assert all(isinstance(channel, int) for channel in specs[0].rgb)


def test_shard_layout_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    write_toy_shards(out, num_train=25, num_val=7, seed=5, samples_per_shard=10, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"] == {
        "num_samples": 25,
        "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"],
    }
    assert manifest["splits"]["val"] == {"num_samples": 7, "shards": ["val-000000.tar"]}
    params = [manifest[key] for key in ("num_train", "num_val", "seed", "samples_per_shard")]
    assert params == [25, 7, 5, 10]
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["manifest.json", "val-000000.tar"] + manifest["splits"]["train"]["shards"]
    )
    assert [path.name for path in tmp_path.iterdir()] == ["toy"]  # no temporary directory left over

    members = _read_tar(out / "train-000001.tar")
    keys = sorted({name.split(".")[0] for name in members})
    assert keys == [f"{index:08d}" for index in range(10, 20)]
    assert set(members) == {f"{key}.{ext}" for key in keys for ext in ("png", "txt", "json")}
    record = json.loads(members["00000010.json"])
    spec = ToySpec(**{**record, "rgb": tuple(record["rgb"])})
    assert members["00000010.txt"].decode() == caption(spec)
    decoded = Image.open(io.BytesIO(members["00000010.png"]))
    assert np.array_equal(np.asarray(decoded), np.asarray(render(spec)))


def test_train_and_val_use_independent_streams(tmp_path: Path) -> None:
    write_toy_shards(tmp_path / "toy", num_train=3, num_val=3, seed=9, progress=False)
    for split, stream in (("train", 0), ("val", 1)):
        members = _read_tar(tmp_path / "toy" / f"{split}-000000.tar")
        expected = sample_spec(np.random.default_rng([9, stream]))
        assert members["00000000.txt"].decode() == caption(expected)


def test_empty_split_writes_no_shard(tmp_path: Path) -> None:
    write_toy_shards(tmp_path / "toy", num_train=4, num_val=0, progress=False)
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert manifest["splits"]["val"] == {"num_samples": 0, "shards": []}
    assert not list((tmp_path / "toy").glob("val-*"))


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_render(spec: ToySpec) -> Image.Image:
        calls.append(spec)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render(spec)

    monkeypatch.setattr(toy, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        write_toy_shards(tmp_path / "toy", 20, 2, samples_per_shard=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "precious.txt").write_text("not a toy dataset")
    with pytest.raises(FileExistsError):
        write_toy_shards(tmp_path / "toy", num_train=2, num_val=1, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["toy"]


def test_ensure_is_idempotent_and_regenerates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "toy"
    assert ensure_toy_shards(out, num_train=6, num_val=2, seed=1) == out
    assert f"in {out}" in capsys.readouterr().out
    stamp = os.stat(out / "manifest.json").st_mtime_ns

    ensure_toy_shards(out, num_train=6, num_val=2, seed=1)
    assert capsys.readouterr().out == ""
    assert os.stat(out / "manifest.json").st_mtime_ns == stamp

    ensure_toy_shards(out, num_train=6, num_val=3, seed=2)
    assert "Generating" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_val"], manifest["seed"]) == (3, 2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["toy"]

    (out / "manifest.json").unlink()  # as if an older tool left shards without a manifest
    ensure_toy_shards(out, num_train=6, num_val=3, seed=2)
    assert (out / "manifest.json").exists()


def test_cli_writes_shards(tmp_path: Path) -> None:
    status = run_script(
        "data_scripts/make_toy_shards.py",
        "--out",
        str(tmp_path / "toy"),
        "--train",
        "5",
        "--val",
        "2",
        "--seed",
        "7",
        "--samples-per-shard",
        "3",
        "--no-progress",
    )
    assert status == 0
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert (manifest["num_val"], manifest["seed"], manifest["samples_per_shard"]) == (2, 7, 3)


def test_cli_into_a_foreign_folder_is_one_line_naming_it_and_the_fix(tmp_path: Path, capsys) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    args = ("data_scripts/make_toy_shards.py", "--out", str(out), "--train", "2", "--val", "1", "--no-progress")
    assert run_script(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out} is not empty") and "--overwrite" in err
    assert [path.name for path in out.iterdir()] == ["holiday.jpg"]
    assert list(tmp_path.iterdir()) == [out]  # nothing was generated first

    assert run_script(*args, "--overwrite") == 0
    assert (out / "manifest.json").exists() and not (out / "holiday.jpg").exists()
