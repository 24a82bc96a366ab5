"""Loader throughput: the project's shard pipeline against a bare PIL loop over the same JPEGs.

    OMP_NUM_THREADS=1 python bench/data_loader.py [--images 2000] [--size 256] [--workers 0 1 2] [--repeats 3]

Makes (once, cached in --data-dir) procedural JPEGs of varied sizes (each side 300-600 px) with
captions, and shards them with `ldm.data.shard_writing` (JPEGs stored byte for byte). Then, per
repeat and interleaved so that machine noise hits every column alike, it times one pass over all
images of:

* pipeline, W workers: `image_caption_pipeline` + `ImageTransform(size, uint8=True)` (decode, RGB,
  resize short side, centre crop, collate) through `wds.WebLoader(num_workers=W)`, as
  `ShardDataModule` reads, and the mapping to [-1, 1] floats in the consuming process;
* bare PIL, max(1, W) processes: open the file, decode (JPEG at the smallest DCT scale that keeps
  the short side >= size, as the loader does), RGB, one bicubic resize of the centre square to
  size x size: the reference, about the least work that gives the loader's pixels;
* bare + ImageTransform, 1 process: full decode then the project's transform (no webdataset, no
  DataLoader, no DCT scaling), to tell transform cost from loader overhead.

Each pass includes process start-up. Rates are medians over repeats of images per wall-clock second
and per CPU second (user + system of every process involved, workers included: far less sensitive
to other load on a shared machine); ratio = pipeline / bare PIL with as many processes, "best" the
ratio of the fastest passes. Target: ratio >= 0.9 (PASS / below target; nothing is asserted).
torch runs one intra-op thread per process (--torch-threads), so W workers use W cores, as the
reference's processes do. Writes DATA_DIR/bench.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from ldm.data.corpus_inputs import folder_items
from ldm.data.shard_writing import write_shards
from ldm.data.transforms import ImageTransform, to_model_range
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
        write_shards(
            items,
            shards,
            prefix="bench",
            samples_per_shard=samples_per_shard,
            overwrite=True,
            total=len(items),
            progress=False,
        )
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
    torch.set_num_threads(threads)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class Rate:
    """One timed pass: images per wall-clock second, and per CPU second of every process involved
    (less sensitive to other load on a shared machine)."""

    wall: float
    cpu: float


def measure(run) -> Rate:
    """Time ``run()`` (which returns the number of images and reaps its processes)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    done = run()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return Rate(done / wall, done / cpu)


def time_bare(fn, paths: list[str], size: int, processes: int, threads: int) -> Rate:
    """``fn`` over ``paths`` split across ``processes`` (start-up included)."""

    def run() -> int:
        if processes <= 1:
            return fn(paths, size)
        slices = [paths[i::processes] for i in range(processes)]
        pool = multiprocessing.get_context("fork").Pool(processes, _init_worker, (threads,))
        done = sum(pool.starmap(fn, [(s, size) for s in slices]))
        pool.close()
        pool.join()  # reaped: their CPU time is counted
        return done

    return measure(run)


def time_pipeline(shards: list[str], size: int, batch_size: int, workers: int, images: int, train: bool) -> Rate:
    """One pass of the project's pipeline through a WebLoader (start-up included)."""
    # as ShardDataModule does: workers ship uint8 pixels, the trainer's process maps them to [-1, 1]
    pipeline = image_caption_pipeline(shards, ImageTransform(size, uint8=True), batch_size=batch_size, train=train)
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)

    def run() -> int:
        done = 0
        batches = iter(loader)
        for batch in batches:
            to_model_range(batch["image"])
            done += len(batch["caption"])
            if done >= images:  # training reads forever; validation ends by itself
                break
        del batches, batch
        gc.collect()  # the iterator's finaliser joins the workers: their CPU time is counted
        return done

    return measure(run)


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

    torch.set_num_threads(args.torch_threads)
    paths, shards = prepare_data(Path(args.data_dir), args.images, args.samples_per_shard, args.seed)
    print(
        f"{len(paths)} JPEGs ({SIDE_RANGE[0]}-{SIDE_RANGE[1]} px sides) in {len(shards)} shards -> {args.size} px, "
        f"batch {args.batch_size}, {'train' if args.train else 'validation'} pipeline; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__} ({args.torch_threads} thread), "
        f"Pillow {PIL.__version__}, Python {platform.python_version()}",
        flush=True,
    )
    rates: dict[str, list[Rate]] = {}

    def record(name: str, rate: Rate) -> None:
        rates.setdefault(name, []).append(rate)
        print(f"  {name:<28}{rate.wall:8.1f} img/s{rate.cpu:8.1f} img/CPU-s", flush=True)

    processes = sorted({max(1, w) for w in args.workers})
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        record("bare + ImageTransform x1", time_bare(bare_transform, paths, args.size, 1, args.torch_threads))
        for count in processes:
            record(f"bare PIL x{count}", time_bare(bare_pil, paths, args.size, count, args.torch_threads))
        for workers in args.workers:
            record(
                f"pipeline workers={workers}",
                time_pipeline(shards, args.size, args.batch_size, workers, len(paths), args.train),
            )

    wall = {name: statistics.median(r.wall for r in values) for name, values in rates.items()}
    cpu = {name: statistics.median(r.cpu for r in values) for name, values in rates.items()}
    best = {name: max(r.wall for r in values) for name, values in rates.items()}  # least disturbed pass
    print(
        f"\nmedians over {args.repeats} repeat(s), one pass over {len(paths)} images; target: ratio >= {TARGET_RATIO}"
    )
    print(f"{'':<9}{'---- images / wall-clock second ----':>40}   {'---- images / CPU second ----':>27}")
    print(
        f"{'workers':<9}{'pipeline':>10}{'bare PIL':>10}{'procs':>6}{'ratio':>7}{'best':>7}   "
        f"{'pipeline':>10}{'bare PIL':>10}{'ratio':>7}"
    )
    results = []
    for workers in args.workers:
        pipe, bare = f"pipeline workers={workers}", f"bare PIL x{max(1, workers)}"
        ratio, cpu_ratio = wall[pipe] / wall[bare], cpu[pipe] / cpu[bare]
        verdict = "PASS" if ratio >= TARGET_RATIO else "below target"
        cpu_verdict = "PASS" if cpu_ratio >= TARGET_RATIO else "below target"
        best_ratio = best[pipe] / best[bare]
        print(
            f"{workers:<9}{wall[pipe]:>10.1f}{wall[bare]:>10.1f}{max(1, workers):>6}{ratio:>7.2f}{best_ratio:>7.2f}   "
            f"{cpu[pipe]:>10.1f}{cpu[bare]:>10.1f}{cpu_ratio:>7.2f}   {verdict} (wall) / {cpu_verdict} (CPU)"
        )
        results.append(
            {
                "workers": workers,
                "pipeline": wall[pipe],
                "bare_pil": wall[bare],
                "ratio": ratio,
                "verdict": verdict,
                "pipeline_per_cpu_s": cpu[pipe],
                "bare_pil_per_cpu_s": cpu[bare],
                "cpu_ratio": cpu_ratio,
                "cpu_verdict": cpu_verdict,
                "best_of_ratio": best_ratio,
            }
        )
    name = "bare + ImageTransform x1"
    print(
        f"bare full decode + ImageTransform, 1 process: {wall[name]:.1f} img/s, {cpu[name]:.1f} img/CPU-s "
        f"({cpu[name] / cpu['bare PIL x1']:.2f} of bare PIL per CPU-s)"
    )
    report = {
        "args": vars(args),
        "rates": {k: [vars(r) for r in v] for k, v in rates.items()},
        "medians_wall": wall,
        "medians_cpu": cpu,
        "results": results,
        "load_average": os.getloadavg(),
    }
    (Path(args.data_dir) / "bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
