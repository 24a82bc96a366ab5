"""Tests for the toy prompt-accuracy metric, validated on real toy shards, clean and degraded."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.data.toy import all_prompts, caption, render, sample_spec, write_toy_shards
from ldm.evaluation.toy_accuracy import (
    NONE,
    ToyAttributes,
    _largest_component,
    classify,
    iter_shard_samples,
    main,
    parse_caption,
    score,
    score_folder,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_REAL = 1000


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real toy dataset: validation split only, NUM_REAL samples."""
    out = tmp_path_factory.mktemp("toy") / "shards"
    write_toy_shards(out, num_train=0, num_val=NUM_REAL, samples_per_shard=500, progress=False)
    return out


@pytest.fixture(scope="module")
def real(shard_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """(uint8 images, captions) read back from the shards."""
    pairs = list(iter_shard_samples(sorted(str(path) for path in shard_dir.glob("val-*.tar"))))
    return [np.asarray(image) for image, _ in pairs], [text for _, text in pairs]


def _blur(image: np.ndarray, kind: str) -> np.ndarray:
    """A 3x3 box blur or a Gaussian blur with sigma 0.7."""
    filters = {"box3": ImageFilter.BoxBlur(1), "gauss0.7": ImageFilter.GaussianBlur(0.7)}
    return np.asarray(Image.fromarray(image).filter(filters[kind]))


def test_parse_caption_round_trips_every_prompt() -> None:
    for prompt in all_prompts():
        attributes = parse_caption(prompt)
        assert f"a {attributes.colour} {attributes.shape} in the {attributes.position}" == prompt
    expected = ToyAttributes("white", "triangle", "center")
    assert parse_caption("a white triangle in the center") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "a red hexagon in the top left",
        "a pink circle in the center",
        "a red circle in the middle",
    ],
)
def test_parse_caption_rejects_non_toy_captions(text: str) -> None:
    with pytest.raises(ValueError, match="not a toy caption"):
        parse_caption(text)


def test_real_images_score_at_least_99_percent(real: tuple[list[np.ndarray], list[str]]) -> None:
    images, prompts = real
    scores = score(images, prompts)
    assert scores["num_images"] == NUM_REAL
    assert scores["all"] >= 0.99, scores


@pytest.mark.parametrize("kind", ["box3", "gauss0.7"])
def test_blurred_images_score_at_least_97_percent(real: tuple[list[np.ndarray], list[str]], kind: str) -> None:
    images, prompts = real
    assert score([_blur(image, kind) for image in images], prompts)["all"] >= 0.97


def test_noisy_images_score_at_least_97_percent(real: tuple[list[np.ndarray], list[str]]) -> None:
    images, prompts = real
    rng = np.random.default_rng(0)
    noisy = [np.clip(x + rng.normal(0, 5, x.shape), 0, 255).astype(np.uint8) for x in images]
    assert score(noisy, prompts)["all"] >= 0.97


def test_blank_and_noise_only_images_are_none() -> None:
    assert classify(np.full((64, 64, 3), 35, np.uint8)) == NONE
    rng = np.random.default_rng(0)
    noise = np.clip(35 + rng.normal(0, 5, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert classify(noise) == NONE
    speck = np.full((64, 64, 3), 35, np.uint8)
    speck[30:32, 30:32] = 255  # a 4-pixel blob is too small to be a shape
    assert classify(speck) == NONE


def test_other_resolutions_are_resampled() -> None:
    spec = sample_spec(np.random.default_rng(3))
    big = render(spec).resize((256, 256), Image.Resampling.BICUBIC)
    assert classify(np.asarray(big)) == parse_caption(caption(spec))
    assert classify(big) == parse_caption(caption(spec))  # PIL images are accepted too


def test_largest_component_is_eight_connected() -> None:
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal line: one component of 3
    mask[5:7, 4:6] = True  # a 2x2 block: 4 pixels, the largest
    blob = _largest_component(mask)
    assert blob.sum() == 4 and blob[5:7, 4:6].all()
    mask[4, 3] = True  # touches the block diagonally, joining it
    assert _largest_component(mask).sum() == 5
    assert not _largest_component(np.zeros((4, 4), bool)).any()


def test_score_counts_each_attribute() -> None:
    spec = sample_spec(np.random.default_rng(1))
    image = np.asarray(render(spec))
    wrong_position = next(p for p in ("top left", "bottom right") if p != spec.position)
    prompts = [caption(spec), f"a {spec.colour} {spec.shape} in the {wrong_position}"]
    scores = score([image, image], prompts)
    assert scores == {"colour": 1.0, "shape": 1.0, "position": 0.5, "all": 0.5, "num_images": 2}
    with pytest.raises(ValueError, match="no images"):
        score([], [])


def _write_folder(folder: Path, count: int) -> None:
    """`count` toy PNGs plus metadata.jsonl, like the output of a sampling script."""
    folder.mkdir()
    rng = np.random.default_rng(11)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index in range(count):
            spec = sample_spec(rng)
            render(spec).save(folder / f"{index:05d}.png")
            metadata.write(json.dumps({"file": f"{index:05d}.png", "prompt": caption(spec)}) + "\n")


def test_score_folder_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "samples"
    _write_folder(folder, 20)
    assert score_folder(folder)["all"] == 1.0
    assert main([str(folder), "--out", str(tmp_path / "metrics.json")]) == 0
    table = capsys.readouterr().out
    assert "all" in table and "1.0000" in table
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 20


def test_cli_scores_shards(shard_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--shards", str(shard_dir / "val-000001.tar")]) == 0
    assert "500" in capsys.readouterr().out


@pytest.mark.parametrize("make_metadata", [False, True])
def test_cli_missing_input_is_a_one_line_error(tmp_path: Path, make_metadata: bool) -> None:
    target = tmp_path / "samples"
    if make_metadata:
        target.mkdir()  # exists, but without metadata.jsonl
    command = [sys.executable, "-m", "ldm.evaluation.toy_accuracy", str(target)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
    assert ("metadata.jsonl" in result.stderr) == make_metadata
