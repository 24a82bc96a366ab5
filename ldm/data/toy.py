"""Toy text-to-image dataset: one coloured shape on a gray background, with a templated caption.

The spec is frozen so that results compare across versions (bump `SPEC_VERSION` if it ever changes):

* 64x64 RGB; background flat gray, level uniform in [20, 50].
* One shape (`SHAPES`), bounding-box side uniform in [16, 26] px (circle diameter = side). The
  triangle points up: apex at the top centre of its box, base along the bottom edge.
* Colour from `COLOURS`, each channel jittered by uniform [-15, +15], then clipped to [0, 255].
* Centre (of the bounding box) at one of `POSITIONS`, (x, y) with y down, each coordinate jittered
  by uniform [-4, +4] px.
* Caption `a {colour} {shape} in the {position}`; colour, shape and position are drawn uniformly.

All draws are integers from one `numpy.random.Generator`, in the order of `sample_spec`, so one
seed gives byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ldm import atomic
from ldm.data.shard_writer import ShardSequenceWriter
from ldm.errors import UserError

SPEC_VERSION = 1
IMAGE_SIZE = 64
BACKGROUND_RANGE = (20, 50)
SIZE_RANGE = (16, 26)
COLOUR_JITTER = 15
POSITION_JITTER = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 50),
    "purple": (150, 70, 210),
    "orange": (240, 140, 40),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}

# PNG compression: level 1 is ~3x faster than the default 6 and only slightly larger at 64x64.
PNG_COMPRESS_LEVEL = 1
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")


@dataclass(frozen=True)
class ToySpec:
    """Everything needed to render one toy image; `centre_*` is the bounding-box centre in px."""

    colour: str
    shape: str
    position: str
    centre_x: int
    centre_y: int
    size: int
    rgb: tuple[int, int, int]
    background: int


def _uniform_int(rng: np.random.Generator, low: int, high: int) -> int:
    """One integer uniform in [low, high], both ends included."""
    return int(rng.integers(low, high, endpoint=True))


def _choice(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    """One option drawn uniformly."""
    return options[int(rng.integers(len(options)))]


def sample_spec(rng: np.random.Generator) -> ToySpec:
    """Draw one toy sample; the draw order is part of the spec (changing it changes every shard)."""
    background = _uniform_int(rng, *BACKGROUND_RANGE)
    shape = _choice(rng, SHAPES)
    colour = _choice(rng, list(COLOURS))
    position = _choice(rng, list(POSITIONS))
    size = _uniform_int(rng, *SIZE_RANGE)
    base_x, base_y = POSITIONS[position]
    centre_x = base_x + _uniform_int(rng, -POSITION_JITTER, POSITION_JITTER)
    centre_y = base_y + _uniform_int(rng, -POSITION_JITTER, POSITION_JITTER)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER, size=3, endpoint=True)
    rgb = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)
    return ToySpec(
        colour=colour,
        shape=shape,
        position=position,
        centre_x=centre_x,
        centre_y=centre_y,
        size=size,
        rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        background=background,
    )


def bounding_box(spec: ToySpec) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of side `spec.size` around the centre.

    For odd sizes the box sits half a pixel right/down of the centre; PIL boxes are inclusive.
    """
    x0 = spec.centre_x - spec.size // 2
    y0 = spec.centre_y - spec.size // 2
    return x0, y0, x0 + spec.size - 1, y0 + spec.size - 1


def render(spec: ToySpec) -> Image.Image:
    """Draw `spec` as a 64x64 RGB image with hard (aliased) edges."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (spec.background,) * 3)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = bounding_box(spec)
    if spec.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=spec.rgb)
    elif spec.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=spec.rgb)
    elif spec.shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=spec.rgb)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    return image


def caption(spec: ToySpec) -> str:
    """The caption of `spec`, e.g. 'a red circle in the top left'."""
    return f"a {spec.colour} {spec.shape} in the {spec.position}"


def all_prompts() -> list[str]:
    """The 105 possible captions, ordered colour, then shape, then position (dict order)."""
    return [f"a {colour} {shape} in the {position}" for colour in COLOURS for shape in SHAPES for position in POSITIONS]


def _png_bytes(image: Image.Image) -> bytes:
    """Encode `image` as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _samples(rng: np.random.Generator, count: int) -> Iterator[dict]:
    """Yield `count` webdataset samples (key, png, txt, json) drawn from `rng`."""
    for index in range(count):
        spec = sample_spec(rng)
        yield {
            "__key__": f"{index:08d}",
            "png": _png_bytes(render(spec)),
            "txt": caption(spec),
            "json": json.dumps(dataclasses.asdict(spec)),
        }


def _write_split(
    directory: Path,
    split: str,
    rng: np.random.Generator,
    count: int,
    samples_per_shard: int,
    bar: tqdm,
) -> list[str]:
    """Write `count` samples to `directory/{split}-%06d.tar`; return the shard names in order
    (an empty split gets no file at all)."""
    with ShardSequenceWriter(directory, split, samples_per_shard) as sink:
        for sample in _samples(rng, count):
            sink.write(sample)
            bar.update(1)
    return [shard.name for shard in sink.shards]


def _params(num_train: int, num_val: int, seed: int) -> dict:
    """The parameters that determine the dataset's content (shard size does not)."""
    return {"spec_version": SPEC_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed}


def _looks_like_toy_dataset(directory: Path) -> bool:
    """Whether `directory` has a manifest or only toy shards, so that replacing it loses nothing."""
    names = [path.name for path in directory.iterdir()]
    return MANIFEST in names or all(SHARD_NAME.fullmatch(name) for name in names)


class NotAToyDataset(UserError, FileExistsError):
    """The output folder holds something other than a toy dataset, which writing would destroy."""


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an `out_dir` that is a file, or a folder holding more than a toy dataset."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotAToyDataset(f"{out_dir} is a file, not a folder; choose a new or empty folder for --out")
    if out_dir.is_dir() and not overwrite and not _looks_like_toy_dataset(out_dir):
        raise NotAToyDataset(
            f"{out_dir} is not empty and holds more than toy shards; choose a new or empty folder, "
            "or pass --overwrite to replace it"
        )


def _publish(tmp_dir: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Move the finished `tmp_dir` to `out_dir`, replacing an older toy dataset that is there
    (anything, with `overwrite`)."""
    if out_dir.exists():
        _check_out_dir(out_dir, overwrite)  # (again: it may have changed while the shards were written)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def write_toy_shards(
    out_dir: str | os.PathLike,
    num_train: int = 20000,
    num_val: int = 1000,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
    overwrite: bool = False,
) -> None:
    """Write `out_dir/{train,val}-%06d.tar` and `out_dir/manifest.json`, atomically.

    Shards are built in a temporary sibling directory that is renamed into place only after the
    manifest is written, so an interrupted run never leaves a dataset that looks complete. An
    existing toy dataset at `out_dir` (a manifest, or nothing but shards) is replaced; a folder
    holding anything else raises `NotAToyDataset` (a `UserError`) before any shard is written,
    unless `overwrite`.
    Train and val draw from independent streams `default_rng([seed, 0])` and `[seed, 1]`.
    """
    if num_train < 0 or num_val < 0 or samples_per_shard < 1:
        raise ValueError("need num_train >= 0, num_val >= 0 and samples_per_shard >= 1")
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
    try:
        splits = {}
        with tqdm(total=num_train + num_val, desc="toy shards", disable=not progress) as bar:
            for stream, (split, count) in enumerate((("train", num_train), ("val", num_val))):
                rng = np.random.default_rng([seed, stream])
                shards = _write_split(tmp_dir, split, rng, count, samples_per_shard, bar)
                splits[split] = {"num_samples": count, "shards": shards}
        manifest = {**_params(num_train, num_val, seed), "samples_per_shard": samples_per_shard}
        manifest["splits"] = splits
        atomic.write_text(tmp_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _publish(tmp_dir, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # no-op once published


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of the dataset at `out_dir`, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def ensure_toy_shards(out_dir: str | os.PathLike, num_train: int = 20000, num_val: int = 1000, seed: int = 0) -> Path:
    """Return `out_dir`, generating the shards first unless its manifest records these parameters.

    Not safe to call from several processes at once: under DDP call it on rank 0, then barrier.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    wanted = _params(num_train, num_val, seed)
    if manifest is None or any(manifest.get(key) != value for key, value in wanted.items()):
        print(f"Generating toy shards ({num_train} train, {num_val} val, seed {seed}) in {out_dir}")
        write_toy_shards(out_dir, num_train=num_train, num_val=num_val, seed=seed)
    return out_dir
