"""Time to the first training batch after a resume at step 0, 1k, 10k and 100k: flat in the step.

    OMP_NUM_THREADS=1 python bench/resume_cost.py [--steps 0 1000 10000 100000] [--workers 0 1] [--repeats 3]

The toy's stream as ``python train.py`` reads it (20 shards of 1,000 64 px PNGs, written once to
--data-dir; batch 32, shuffle buffer 2000; ``ShardDataModule``'s decoding), one rank. For each step
K, the position a checkpoint at step K holds is made by running the worker's real stream state
machine (``WorkerStream``: shard draws, mix, shuffle) through K x 32 samples over stand-in shards
that hold the same keys but are never read ("simulated": 100k steps of reading and decoding would
take hours here); the simulation is checked against the position the real stream (reading and
decoding) reaches at a small step. Then, per repeat, it times a ``TrainingLoader`` started from that
position, with real shards and decoding, to its first batch (loader workers started included), and
the replay the previous code did: decoding every batch of the epoch before K, measured over
--replay-batches batches and extrapolated (a line of that slope through the step-0 time). Medians
over repeats; the ratio is each step's time over step 0's (goal: under 2x). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ldm.data.captions import CaptionPicker
from ldm.data.samples import ToTrainingSample
from ldm.data.seeds import stream_seed
from ldm.data.shard_reader import read_shard
from ldm.data.shards import Source, expand_shards
from ldm.data.skips import DataCounts
from ldm.data.streams import POSITION_KEY, ShardStream
from ldm.data.toy import write_toy_shards
from ldm.data.training_loader import TrainingLoader
from ldm.data.transforms import ImageTransform
from ldm.data.worker_stream import WorkerStream

BATCH, SHUFFLE, SEED = 32, 2000, 0


def toy_shards(directory: Path) -> list[str]:
    if not (directory / "manifest.json").is_file():
        write_toy_shards(directory, num_train=20000, num_val=0, seed=0, progress=True)
    return expand_shards(str(directory / "train-*.tar"))


def make_stream(urls: list[str]) -> ShardStream:
    to_sample = ToTrainingSample(ImageTransform(64, uint8=True), CaptionPicker(["txt"]))
    return ShardStream(
        [Source(urls)], to_sample, BATCH, train=True, seed=SEED, shuffle_buffer=SHUFFLE, rank=0, world_size=1
    )


def simulated_position(urls: list[str], index: dict[str, list[dict]], step: int) -> dict:
    """The worker state after ``step`` batches, from the stream's own state machine over stand-in
    shards (``index``: each shard's samples without their members: key, url, offsets), nothing read
    or decoded; valid for a stream that drops no sample (the toy's: every sample decodes, one size)."""

    def stand_in(url: str, start: int = 0, offset: int = -1):
        return iter(index[url][start:])

    stream = WorkerStream([Source(urls)], partial(stream_seed, SEED, 0, 0, 0), stand_in, SHUFFLE, lambda: ("", "", ""))
    for _ in range(step * BATCH):
        stream.next()
    return {"stream": stream.state(), "pending": [], "errors": 0, "batches": step}


def first_batch_seconds(urls: list[str], state: dict | None, step: int, workers: int) -> tuple[float, list[str]]:
    """Seconds from a resumed loader's iter() to its first batch, and the batch's keys."""
    loader = TrainingLoader(
        make_stream(urls),
        lambda s: DataLoader(s, batch_size=None, num_workers=workers),
        workers,
        lambda: (0, step),
        lambda epoch, done: [state] if state is not None else None,
    )
    start = time.perf_counter()
    batch = next(iter(loader))
    return time.perf_counter() - start, batch["key"]


def replay_seconds_per_batch(urls: list[str], batches: int) -> float:
    """What the previous resume paid per skipped batch: reading and decoding it."""
    stream = iter(make_stream(urls))
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1000, 10000, 100000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--replay-batches", type=int, default=100)
    parser.add_argument("--check-step", type=int, default=60, help="step at which the simulation is checked")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/ldm_bench_resume/toy"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    urls = toy_shards(args.data_dir)
    counts = DataCounts()
    keep = ("__key__", "__url__", "__offset__", "__end__")
    index = {url: [{k: raw[k] for k in keep} for raw in read_shard(url, counts)] for url in urls}

    # the simulated position is the real one: checked at a step the real stream can reach here
    real = list(itertools.islice(iter(make_stream(urls)), args.check_step))[-1][POSITION_KEY].state
    same = simulated_position(urls, index, args.check_step) == real
    print(f"simulated position at step {args.check_step} equals the real stream's: {'yes' if same else 'NO'}")

    states = {step: simulated_position(urls, index, step) if step else None for step in args.steps}
    sizes = {step: len(pickle.dumps(state)) if state else 0 for step, state in states.items()}
    per_batch = replay_seconds_per_batch(urls, args.replay_batches)
    times = {(step, workers): [] for step in args.steps for workers in args.workers}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every column alike
        for step in args.steps:
            for workers in args.workers:
                seconds, batch_keys = first_batch_seconds(urls, states[step], step, workers)
                times[(step, workers)].append(seconds)
    medians = {key: statistics.median(value) for key, value in times.items()}

    print(
        f"\ntoy stream: {len(urls)} shards x 1000 samples, batch {BATCH}, shuffle buffer {SHUFFLE}; "
        f"replay measured at {per_batch * 1e3:.1f} ms/batch over {args.replay_batches} batches; "
        f"medians of {args.repeats}"
    )
    header = "  ".join(f"{'first batch, ' + str(w) + ' workers':>24} {'x step 0':>8}" for w in args.workers)
    print(f"{'step':>7}  {header}  {'replay (old), 0 workers':>24} {'x step 0':>8}  {'position bytes':>14}")
    for step in args.steps:
        cells = "  ".join(
            f"{medians[(step, w)]:>22.3f} s {medians[(step, w)] / medians[(args.steps[0], w)]:>8.2f}"
            for w in args.workers
        )
        replay = medians[(args.steps[0], args.workers[0])] + step * per_batch
        print(
            f"{step:>7}  {cells}  {replay:>20.1f} s{'*' if step else ' '} "
            f"{replay / medians[(args.steps[0], args.workers[0])]:>9.0f}  {sizes[step]:>14,}"
        )
    print("* extrapolated: step 0's time + step x the measured replay time per batch")
    out = args.data_dir.parent / "resume_cost.json"
    out.write_text(
        json.dumps(
            {
                "medians": {f"{s}/{w}": v for (s, w), v in medians.items()},
                "replay_per_batch": per_batch,
                "simulation_checked": same,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
