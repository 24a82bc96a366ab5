"""Loader throughput: the project's shard pipeline against a bare PIL loop over the same JPEGs.

    OMP_NUM_THREADS=1 python bench/data_loader.py [--images 2000] [--size 256] [--workers 0 1 2] [--repeats 3]

Makes (once, cached in --data-dir) procedural JPEGs of varied sizes (each side 300-600 px) with
captions, and shards them with `ldm.data.shard_writing` (JPEGs stored byte for byte). Then, per
repeat and interleaved so that machine noise hits every column alike, it times one pass over all
images of:

* pipeline, W workers: `image_caption_pipeline` + `ImageTransform(size)` (decode, RGB, resize short
  side, centre crop, [-1, 1] tensor, collate) through `wds.WebLoader(num_workers=W)`;
* bare PIL, max(1, W) processes: open the file, decode (JPEG at the smallest DCT scale that keeps
  the short side >= size, as the loader does), RGB, one bicubic resize of the centre square to
  size x size: the reference, about the least work that gives the loader's pixels;
* bare + ImageTransform, 1 process: full decode then the project's transform (no webdataset, no
  DataLoader, no DCT scaling), to tell transform cost from loader overhead.

Each pass includes process start-up. Rates are images/s, medians over repeats; ratio = pipeline /
bare PIL with as many processes. Target: ratio >= 0.9 (PASS / below target; nothing is asserted).
torch runs one intra-op thread per process (--torch-threads), so W workers use W cores, as the
reference's processes do. Writes DATA_DIR/bench.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from ldm.data.shard_writing import folder_items, write_shards
from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import image_caption_pipeline  # imported here: no import inside a timing

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.9
SIDE_RANGE = (300, 600)
JPEG_QUALITY = 90


# ------------------------------------------------------------------------------------------- data


def draw_image(rng: np.random.Generator) -> Image.Image:
    """A photo-like test image: a smooth gradient, a few shapes, mild noise; sides in SIDE_RANGE."""
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1], size=2, endpoint=True))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    corners = rng.uniform(0, 255, size=(2, 3))
    t = (x / width + y / height)[..., None] / 2  # (H, W, 1) in [0, 1]
    pixels = corners[0] * (1 - t) + corners[1] * t
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def prepare_data(data_dir: Path, count: int, samples_per_shard: int, seed: int) -> tuple[list[str], list[str]]:
    """(JPEG paths, shard paths), generated unless data_dir's manifest records these parameters."""
    params = {"count": count, "samples_per_shard": samples_per_shard, "seed": seed, "quality": JPEG_QUALITY}
    images, shards, manifest = data_dir / "images", data_dir / "shards", data_dir / "data.json"
    if not (manifest.exists() and json.loads(manifest.read_text()) == params):
        print(f"making {count} JPEGs and their shards in {data_dir} ...", flush=True)
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for index in range(count):
            draw_image(rng).save(images / f"{index:05d}.jpg", quality=JPEG_QUALITY)
            (images / f"{index:05d}.txt").write_text(f"test image {index}")
        items = folder_items(images)
        write_shards(items, shards, prefix="bench", samples_per_shard=samples_per_shard, overwrite=True,
                     total=len(items), progress=False)
        manifest.write_text(json.dumps(params))
    paths = sorted(str(p) for p in images.glob("*.jpg"))[:count]
    return paths, sorted(str(p) for p in shards.glob("bench-*.tar"))


# ----------------------------------------------------------------------------------------- timing


def bare_pil(paths: list[str], size: int) -> int:
    """Decode (DCT-scaled where the short side allows), RGB, centre square resized to ``size``."""
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG" and min(width, height) > size:
                scale = size / min(width, height)
                image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
            image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return len(paths)


def bare_transform(paths: list[str], size: int) -> int:
    """Full decode, then the project's ImageTransform (crop and resize, to a [-1, 1] tensor)."""
    transform = ImageTransform(size)
    for path in paths:
        with Image.open(path) as image:
            image.load()
            transform(image)
    return len(paths)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def time_bare(fn, paths: list[str], size: int, processes: int, threads: int) -> float:
    """Images/s of ``fn`` over ``paths`` split across ``processes`` (start-up included)."""
    start = time.perf_counter()
    if processes <= 1:
        done = fn(paths, size)
    else:
        slices = [paths[i::processes] for i in range(processes)]
        with multiprocessing.get_context("fork").Pool(processes, _init_worker, (threads,)) as pool:
            done = sum(pool.starmap(fn, [(s, size) for s in slices]))
    return done / (time.perf_counter() - start)


def time_pipeline(shards: list[str], size: int, batch_size: int, workers: int, images: int, train: bool) -> float:
    """Images/s of one pass of the project's pipeline through a WebLoader (start-up included)."""
    pipeline = image_caption_pipeline(shards, ImageTransform(size), batch_size=batch_size, train=train)
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    start = time.perf_counter()
    done = 0
    for batch in loader:
        done += len(batch["caption"])
        if done >= images:  # training reads forever; validation ends by itself
            break
    seconds = time.perf_counter() - start
    del loader  # shuts the workers down
    if done < images:
        print(f"  note: the pipeline delivered {done} of {images} images", flush=True)
    return done / seconds


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "outputs" / "bench_data_loader"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--train", action="store_true", help="time the training pipeline (resampled, shuffled)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import PIL
    import torch

    torch.set_num_threads(args.torch_threads)
    paths, shards = prepare_data(Path(args.data_dir), args.images, args.samples_per_shard, args.seed)
    print(
        f"{len(paths)} JPEGs ({SIDE_RANGE[0]}-{SIDE_RANGE[1]} px sides) in {len(shards)} shards -> {args.size} px, "
        f"batch {args.batch_size}, {'train' if args.train else 'validation'} pipeline; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__} ({args.torch_threads} thread), "
        f"Pillow {PIL.__version__}, Python {platform.python_version()}",
        flush=True,
    )
    rates: dict[str, list[float]] = {}

    def record(name: str, rate: float) -> None:
        rates.setdefault(name, []).append(rate)
        print(f"  {name:<28}{rate:8.1f} img/s", flush=True)

    processes = sorted({max(1, w) for w in args.workers})
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        record("bare + ImageTransform x1", time_bare(bare_transform, paths, args.size, 1, args.torch_threads))
        for count in processes:
            record(f"bare PIL x{count}", time_bare(bare_pil, paths, args.size, count, args.torch_threads))
        for workers in args.workers:
            rate = time_pipeline(shards, args.size, args.batch_size, workers, len(paths), args.train)
            record(f"pipeline workers={workers}", rate)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nmedians over {args.repeats} repeat(s), images/s (one pass over {len(paths)} images)")
    print(f"{'workers':<9}{'pipeline':>10}{'bare PIL':>10}{'procs':>7}{'ratio':>8}  target >= {TARGET_RATIO}")
    results = []
    for workers in args.workers:
        pipeline, bare = medians[f"pipeline workers={workers}"], medians[f"bare PIL x{max(1, workers)}"]
        ratio = pipeline / bare
        verdict = "PASS" if ratio >= TARGET_RATIO else "below target"
        print(f"{workers:<9}{pipeline:>10.1f}{bare:>10.1f}{max(1, workers):>7}{ratio:>8.2f}  {verdict}")
        results.append({"workers": workers, "pipeline": pipeline, "bare_pil": bare, "ratio": ratio, "verdict": verdict})
    transform = medians["bare + ImageTransform x1"]
    print(f"bare decode + ImageTransform, 1 process: {transform:.1f} img/s "
          f"({transform / medians['bare PIL x1']:.2f} of bare PIL): the transform's share of any gap")
    report = {"args": vars(args), "rates": rates, "medians": medians, "results": results,
              "load_average": os.getloadavg()}
    (Path(args.data_dir) / "bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
