"""One stream, two decoders: image shards and precomputed latent shards resume exactly (1 and 2 ranks,
with loader workers, deep into an epoch, from a position restored without decoding), are seeded
alike, and skip and count bad shards and samples alike."""

from __future__ import annotations

import io
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from latent_corpus import (
    LATENT_SHAPE,
    empty_context,
    latent_header,
    latent_meta,
    latent_sample,
    npy,
    write_latent_shard,
)
from shard_corpus import write_good_shard, write_tar

from ldm.data.latent_samples import ToLatentSample
from ldm.data.samples import ToTrainingSample
from ldm.data.shards import Source
from ldm.data.streams import POSITION_KEY, ShardStream, StreamStart
from ldm.data.transforms import ImageTransform
from ldm_testing import run_training_loader

SIZES = (5, 17, 40)  # uneven shards
BATCH = 4
PER_RANK = 30  # batches per rank and epoch: samples_per_epoch = world_size x PER_RANK x BATCH
TENSORS = {"images": ("image",), "latents": ("latent", "context")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    directory = tmp_path_factory.mktemp("two_streams")
    keys = [[f"s{i}-{j:03d}" for j in range(n)] for i, n in enumerate(SIZES)]
    return {
        "images": [write_good_shard(directory / f"img{i}.tar", k, size=(10, 8)) for i, k in enumerate(keys)],
        "latents": [write_latent_shard(directory / f"lat{i}.tar", k) for i, k in enumerate(keys)],
    }


def decoder(kind: str, train: bool = True):
    """Both with random choices to reproduce: random crops and flips; noise, caption dropout and flips."""
    if kind == "images":
        return ToTrainingSample(ImageTransform(8, center_crop=False, random_flip=train))
    return ToLatentSample(
        latent_meta(), empty_context(), train, caption_dropout=0.3 if train else 0.0, random_flip=train
    )


def stream(kind: str, urls: list[str], rank: int = 0, world_size: int = 1, to_sample=None, **options) -> ShardStream:
    options = {"seed": 5, "shuffle_buffer": 16, "samples_per_epoch": world_size * PER_RANK * BATCH, **options}
    return ShardStream(
        [Source(urls[:2], 2.0), Source(urls[2:])],
        to_sample or decoder(kind),
        BATCH,
        train=True,
        rank=rank,
        world_size=world_size,
        **options,
    )


def assert_same_batches(kind: str, a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [y["key"] for y in b]
    assert [x["caption"] for x in a] == [y["caption"] for y in b]
    for name in TENSORS[kind]:
        assert all(torch.equal(x[name], y[name]) for x, y in zip(a, b)), name


@pytest.mark.parametrize("kind", ["images", "latents"])
@pytest.mark.parametrize("world_size, workers", [(1, 0), (1, 2), (2, 2)])
def test_resume_deep_into_an_epoch_is_exact(shards, kind, world_size, workers):
    """Epoch 1, stopped after 23 of its 30 batches (mid-round of 2 workers), resumed from the saved
    position: the rest of the epoch is the same, to the bit, on every rank."""
    per_rank = []
    for rank in range(world_size):

        def make():
            return stream(kind, shards[kind], rank, world_size)

        straight, saved = run_training_loader(make, workers, 0, None, PER_RANK + 5, save_at=23, epoch=1)
        assert len(straight) == PER_RANK  # the epoch ends: equal batches on every rank
        assert saved["done"] == 23 and all(state is not None for state in saved["workers"])
        resumed, _ = run_training_loader(make, workers, 23, saved["workers"], PER_RANK, epoch=1)
        assert len(resumed) == PER_RANK - 23
        assert_same_batches(kind, straight[23:], resumed)
        per_rank.append([key for batch in straight for key in batch["key"]])
    if world_size == 2:
        assert per_rank[0] != per_rank[1]  # every rank its own stream


@pytest.mark.parametrize("kind", ["images", "latents"])
def test_the_seed_and_the_place_decide_the_stream(shards, kind):
    def first_keys(**options):
        return [b["key"] for b in itertools.islice(iter(stream(kind, shards[kind], **options)), 3)]

    reference = first_keys()
    assert first_keys() == reference
    assert first_keys(seed=6) != reference
    assert first_keys(rank=1, world_size=2) != first_keys(rank=0, world_size=2)
    again = stream(kind, shards[kind])
    again.start = StreamStart(epoch=1)
    assert [b["key"] for b in itertools.islice(iter(again), 3)] != reference


@pytest.mark.parametrize("kind", ["images", "latents"])
def test_a_resume_decodes_only_what_the_next_batch_needs(shards, kind):
    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, raw, rng):
            self.calls += 1
            return self.inner(raw, rng)

    endless = dict(samples_per_epoch=None)
    batches = list(itertools.islice(iter(stream(kind, shards[kind], **endless)), 150))
    counting = Counting(decoder(kind))
    if kind == "latents":
        counting.check_header = counting.inner.check_header  # (a latent decoder checks each shard's header)
    resumed = stream(kind, shards[kind], to_sample=counting, **endless)
    resumed.start = StreamStart(0, 149, [batches[148][POSITION_KEY].state])
    assert_same_batches(kind, [next(iter(resumed))], batches[149:150])
    assert counting.calls == BATCH


def test_latent_flips_and_caption_dropout_are_drawn_per_sample(shards):
    batches = list(itertools.islice(iter(stream("latents", shards["latents"], samples_per_epoch=None)), 40))
    rows = [
        (key, latent, caption) for b in batches for key, latent, caption in zip(b["key"], b["latent"], b["caption"])
    ]
    means = {key: np.load(io.BytesIO(dict(latent_sample(key))[f"{key}.mean.npy"])) for key, _, _ in rows}
    # logvar -4: std e^-2, so the sign of latent / 0.5 (the scaling) shows which mean was drawn
    flipped = [
        bool((torch.sign(latent) == -torch.sign(torch.from_numpy(means[key]))).float().mean() > 0.9)
        for key, latent, _ in rows
    ]
    assert 0.35 < np.mean(flipped) < 0.65  # half of them the flipped image's latent
    dropped = [caption == "" for _, _, caption in rows]
    assert 0.18 < np.mean(dropped) < 0.42  # caption_dropout 0.3
    assert all(
        torch.equal(b["context"][i], torch.from_numpy(empty_context()))
        for b in batches
        for i, caption in enumerate(b["caption"])
        if caption == ""
    )


@pytest.fixture(scope="module")
def bad_latent_shards(tmp_path_factory) -> tuple[list[str], set[str]]:
    """Latent shards with every kind of bad shard and sample; returns (urls, keys of the good samples)."""
    directory = tmp_path_factory.mktemp("bad_latents")
    good_keys = {f"g{i:02d}" for i in range(6)}
    nan = [
        (name, npy(np.full(LATENT_SHAPE, np.nan, np.float32)) if name.endswith(".mean.npy") else m)
        for name, m in latent_sample("nan0")
    ]
    misshapen = [
        (name, npy(np.zeros((4, 3, 3), np.float32)) if name.endswith(".logvar.npy") else m)
        for name, m in latent_sample("shape0")
    ]
    missing = [(name, m) for name, m in latent_sample("miss0") if not name.endswith(".context.npy")]
    garbled = [(name, b"\x93NUMPY garbage" if name.endswith(".mean.npy") else m) for name, m in latent_sample("garb0")]
    urls = [
        write_latent_shard(directory / "good.tar", sorted(good_keys)),
        write_tar(directory / "samples.tar", latent_header() + nan + misshapen + missing + garbled),
        write_tar(directory / "headless.tar", [m for m in latent_sample("headless0")]),
        write_latent_shard(directory / "foreign.tar", ["foreign0"], latent_meta(fingerprint="another vae")),
    ]
    (directory / "garbage.tar").write_bytes(b"not a tar" * 100)
    urls.append(str(directory / "garbage.tar"))
    return urls, good_keys


def test_a_corrupt_latent_shard_is_skipped_and_counted_like_a_corrupt_image_shard(bad_latent_shards):
    urls, good_keys = bad_latent_shards
    val = ShardStream([Source(urls)], decoder("latents", train=False), 4, train=False)
    batches = list(val)
    assert {key for b in batches for key in b["key"]} == good_keys
    counts = Counter()
    for batch in batches:
        counts.update(batch["skipped"])
    assert counts == {
        "skipped/corrupt_latent": 4,
        "skipped/not_latent_shard": 1,
        "skipped/foreign_latent_shard": 1,
        "skipped/unreadable_shard": 1,
    }
    # training draws them again and again: it keeps going on the good samples
    no_flips = ToLatentSample(latent_meta(), empty_context(), True)  # (the flipped members are intact)
    train = ShardStream([Source(urls)], no_flips, 4, train=True, shuffle_buffer=8)
    trained = list(itertools.islice(iter(train), 12))
    assert {key for b in trained for key in b["key"]} <= good_keys
    assert sum(b["skipped"].get("skipped/corrupt_latent", 0) for b in trained) >= 4


def test_latent_validation_splits_samples_when_there_are_fewer_shards_than_ranks(shards):
    one_shard = shards["latents"][2:]  # 40 samples
    per_rank = [
        [
            key
            for b in ShardStream(
                [Source(one_shard)], decoder("latents", train=False), 4, train=False, rank=rank, world_size=3
            )
            for key in b["key"]
        ]
        for rank in range(3)
    ]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(k for keys in per_rank for k in keys) == [f"s2-{j:03d}" for j in range(40)]


def test_latent_sources_mix_by_weight(tmp_path):
    big = [write_latent_shard(tmp_path / f"big{i}.tar", [f"big{i}-{j:02d}" for j in range(20)]) for i in range(3)]
    small = [write_latent_shard(tmp_path / f"small{i}.tar", [f"small{i}-{j:02d}" for j in range(20)]) for i in range(3)]
    mixed = ShardStream([Source(big, 3.0), Source(small, 1.0)], decoder("latents"), 20, train=True, shuffle_buffer=50)
    keys = [key for batch in itertools.islice(iter(mixed), 80) for key in batch["key"]]
    assert 0.70 < Counter(key.startswith("big") for key in keys)[True] / len(keys) < 0.80  # 3 : 1


@pytest.mark.parametrize("kind", ["images", "latents"])
def test_a_resume_whose_shards_are_gone_goes_on_with_a_warning(shards, kind, tmp_path, caplog):
    import shutil

    urls = [str(shutil.copy(url, tmp_path / f"copy{i}.tar")) for i, url in enumerate(shards[kind])]
    endless = dict(samples_per_epoch=None)
    batches = list(itertools.islice(iter(stream(kind, urls, **endless)), 30))
    state = batches[-1][POSITION_KEY].state
    buffered = {url for pairs in state["stream"]["shard_urls"] for _, url in pairs}
    gone = sorted(buffered)[0]
    Path(gone).unlink()
    resumed = stream(kind, urls, **endless)
    resumed.start = StreamStart(0, 30, [state])
    after = list(itertools.islice(iter(resumed), 20))
    assert len(after) == 20 and all(len(b["key"]) == BATCH for b in after)
    assert "cannot be read again" in caplog.text or "could not read again" in caplog.text
