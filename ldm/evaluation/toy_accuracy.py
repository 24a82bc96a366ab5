"""Toy prompt accuracy: colour, shape and position read back from pixel statistics alone.

The classifier is built to survive blurry or noisy samples (diffusion samples decoded by a VAE):

1. background = per-channel median of the border pixels;
2. strength = max over channels of |pixel - background|; the shape is the largest 8-connected blob
   of pixels above half the image's peak strength (a half-maximum contour keeps the geometry of a
   symmetrically blurred edge);
3. colour = nearest palette colour to the median RGB of the blob's core (strong) pixels, which
   blurred edges do not reach;
4. position = nearest of the five centres to the centre of the blob's bounding box;
5. shape = triangle if most of the blob lies in the lower half of its box (an upward triangle has
   3/4 of its area there), else square if it fills its box (~1.0) and circle otherwise (~pi/4).

Usage: `python -m ldm.evaluation.toy_accuracy DIR [--out metrics.json]` where DIR holds images and
a `metadata.jsonl` ({"file": ..., "prompt": ...} per line), or `--shards 'DIR/val-*.tar'` to score
real toy shards.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldm import atomic
from ldm.data.shard_reader import read_shard
from ldm.data.shards import expand_shards
from ldm.data.skips import DataCounts
from ldm.data.toy import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES

# Below this peak strength (0-255 scale) the image holds no shape. Every jittered palette colour is
# at least 115 away from any background in its strongest channel, so 40 leaves a wide margin.
MIN_CONTRAST = 40.0
# A blob smaller than this fraction of the image is noise (the smallest toy triangle covers ~3%).
MIN_AREA_FRACTION = 0.005
# Fraction of the peak strength that marks a pixel as part of the shape (half maximum).
MASK_LEVEL = 0.5
# Pixels at least this fraction of the blob's peak strength are "core" pixels used for colour.
CORE_LEVEL = 0.8
# (lower half - upper half) / area of the blob: ~0.5 for an upward triangle (> 0.2 even when
# heavily blurred), ~0 for circle and square (|x| < 0.1).
TRIANGLE_ASYMMETRY = 0.18
# Fill ratio of the bounding box between a circle (~0.78) and a square (1.0).
SQUARE_FILL = 0.89

CAPTION_RE = re.compile(r"^a (?P<colour>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+)$")


@dataclass(frozen=True)
class ToyAttributes:
    """What a toy image shows; every field is "none" when no shape is found."""

    colour: str
    shape: str
    position: str


NONE = ToyAttributes("none", "none", "none")


def parse_caption(text: str) -> ToyAttributes:
    """Attributes named by a toy caption such as 'a red circle in the top left'."""
    match = CAPTION_RE.match(text.strip())
    if match is None:
        expected = "'a {colour} {shape} in the {position}'"
        raise ValueError(f"not a toy caption (expected {expected}): {text!r}")
    attributes = ToyAttributes(**match.groupdict())
    for value, options in (
        (attributes.colour, COLOURS),
        (attributes.shape, SHAPES),
        (attributes.position, POSITIONS),
    ):
        if value not in options:
            raise ValueError(f"not a toy caption: {value!r} is none of {list(options)} in {text!r}")
    return attributes


def _as_rgb64(image: np.ndarray | Image.Image) -> np.ndarray:
    """(64, 64, 3) float32 RGB in [0, 255]; other sizes are area-resampled to the toy resolution."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
        if image.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
            return image.astype(np.float32)
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _background(image: np.ndarray) -> np.ndarray:
    """(3,) per-channel median of the one-pixel border; shapes touch the border at most briefly."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # (252, 3)
    return np.median(border, axis=0)


def _row_runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, start, stop) of each horizontal run of True pixels, row-major, stop exclusive."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))  # (H, W + 2): every run has two edges
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # row-major, so edges pair up as start, stop
    return list(zip(rows[::2].tolist(), cols[::2].tolist(), cols[1::2].tolist()))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean (H, W) mask, by union-find over row runs."""
    runs = _row_runs(mask)
    if not runs:
        return np.zeros_like(mask)
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []  # run indices in the row above
    current: list[int] = []
    for index, (y, start, stop) in enumerate(runs):
        if index and runs[index - 1][0] != y:
            previous = current if runs[index - 1][0] == y - 1 else []
            current = []
        for other in previous:  # 8-connected: runs touch if they overlap or meet diagonally
            if runs[other][1] <= stop and start <= runs[other][2]:
                parent[find(other)] = find(index)
        current.append(index)
    sizes: dict[int, int] = {}
    for index, (_, start, stop) in enumerate(runs):
        root = find(index)
        sizes[root] = sizes.get(root, 0) + stop - start
    largest = max(sizes, key=sizes.__getitem__)
    blob = np.zeros_like(mask)
    for index, (y, start, stop) in enumerate(runs):
        if find(index) == largest:
            blob[y, start:stop] = True
    return blob


def _nearest(point: np.ndarray, table: dict[str, tuple[int, ...]]) -> str:
    """Key of `table` whose value is nearest (Euclidean) to `point`."""
    names = list(table)
    distances = np.linalg.norm(np.array([table[name] for name in names]) - point, axis=1)
    return names[int(np.argmin(distances))]


def _shape(blob: np.ndarray, box: tuple[int, int, int, int]) -> str:
    """Shape name from the blob's vertical mass asymmetry and its fill of the bounding box."""
    x0, y0, x1, y1 = box  # inclusive
    area = blob.sum()
    mid = (y0 + y1 + 1) / 2  # box centre in continuous coordinates; row y spans [y, y + 1)
    rows = np.arange(blob.shape[0]) + 0.5
    per_row = blob.sum(axis=1)
    asymmetry = (per_row[rows > mid].sum() - per_row[rows < mid].sum()) / area
    if asymmetry > TRIANGLE_ASYMMETRY:
        return "triangle"
    fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
    return "square" if fill > SQUARE_FILL else "circle"


def classify(image: np.ndarray | Image.Image) -> ToyAttributes:
    """Colour, shape and position of the shape in a uint8 (H, W, 3) toy image, or `NONE`."""
    pixels = _as_rgb64(image)  # (64, 64, 3)
    strength = np.abs(pixels - _background(pixels)).max(axis=2)  # (64, 64)
    # The 99th percentile ignores a few hot pixels yet lies inside even the smallest shape (~3%).
    peak = float(np.percentile(strength, 99))
    if peak < MIN_CONTRAST:
        return NONE
    blob = _largest_component(strength > MASK_LEVEL * peak)
    if blob.sum() < MIN_AREA_FRACTION * blob.size:
        return NONE
    ys, xs = np.nonzero(blob)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    core = blob & (strength >= CORE_LEVEL * strength[blob].max())
    colour = _nearest(np.median(pixels[core], axis=0), COLOURS)
    centre = np.array([(box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2])
    position = _nearest(centre, POSITIONS)
    return ToyAttributes(colour=colour, shape=_shape(blob, box), position=position)


def score(images: Iterable[np.ndarray | Image.Image], prompts: Iterable[str]) -> dict:
    """Fraction of images whose colour, shape, position (and `all` three) match their prompt.

    Returns {"colour", "shape", "position", "all": float in [0, 1], "num_images": int}.
    """
    keys = ("colour", "shape", "position")
    hits = dict.fromkeys((*keys, "all"), 0)
    count = 0
    for image, prompt in zip(images, prompts, strict=True):
        wanted, found = parse_caption(prompt), classify(image)
        matches = [getattr(wanted, key) == getattr(found, key) for key in keys]
        for key, match in zip(keys, matches):
            hits[key] += match
        hits["all"] += all(matches)
        count += 1
    if count == 0:
        raise ValueError("no images to score")
    return {**{key: value / count for key, value in hits.items()}, "num_images": count}


def _read_metadata(folder: Path) -> list[dict]:
    """Records of `folder/metadata.jsonl`, each with at least `file` and `prompt`."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"no metadata.jsonl in {folder}")
    records = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    for number, record in enumerate(records, start=1):
        if "file" not in record or "prompt" not in record:
            raise ValueError(f"{metadata}:{number}: each line needs 'file' and 'prompt'")
    return records


def score_folder(path: str | Path) -> dict:
    """`score` the images listed in `path/metadata.jsonl` against their prompts."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such directory: {folder}")
    records = _read_metadata(folder)
    images = (Image.open(folder / record["file"]) for record in records)
    return score(images, [record["prompt"] for record in records])


def iter_shard_samples(paths: Iterable[str]) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) of every sample with a .png and a .txt in the given toy tars (read by
    ``ldm.data.shard_reader``: member size caps; a shard that cannot be read whole is an error, since a
    score over part of a set would not compare)."""
    counts = DataCounts()
    for path in paths:
        for sample in read_shard(path, counts):
            if "png" in sample and "txt" in sample:
                yield Image.open(io.BytesIO(sample["png"])), sample["txt"].decode("utf-8")
        if counts.take():
            reason, where, detail = counts.last_skip
            raise ValueError(
                f"{where or path}: {reason.replace('_', ' ')} ({detail}): the score would be of part of the set"
            )


def score_shards(patterns: str | Iterable[str]) -> dict:
    """`score` the samples of toy shards (e.g. 'data/toy/val-*.tar') against their captions."""
    pairs = list(iter_shard_samples(expand_shards(patterns)))
    return score([image for image, _ in pairs], [text for _, text in pairs])


def format_table(scores: dict) -> str:
    """Scores as a small two-column text table."""
    lines = [f"{'metric':<10}{'accuracy':>10}"]
    lines += [f"{key:<10}{scores[key]:>10.4f}" for key in ("colour", "shape", "position", "all")]
    lines.append(f"{'images':<10}{scores['num_images']:>10d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", help="folder with images and metadata.jsonl")
    parser.add_argument("--shards", nargs="+", help="score toy tars (paths or globs) instead")
    parser.add_argument("--out", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    if (args.dir is None) == (args.shards is None):
        parser.error("give either DIR or --shards")
    try:
        scores = score_shards(args.shards) if args.shards else score_folder(args.dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(scores))
    if args.out:
        atomic.write_text(args.out, json.dumps(scores, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
