"""Aspect-ratio buckets: the auto set, nearest-bucket choice, no upscaling, crops to a bucket, and shard
streams that batch one bucket at a time."""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from shard_corpus import good_sample, write_tar

from ldm.data.buckets import BucketedSample, auto_buckets, header_size, nearest_bucket, resolve_buckets
from ldm.data.shards import Source
from ldm.data.skips import TOO_SMALL, SkipSample
from ldm.data.streams import POSITION_KEY, ShardStream, StreamStart
from ldm.data.transforms import ImageTransform
from ldm.data.webdataset import ShardDataModule
from ldm.errors import UserError

BUCKETS_32 = [(24, 40), (32, 32), (40, 24)]  # a small set of about 32^2 pixels


def test_auto_buckets_around_512_are_the_usual_set():
    buckets = auto_buckets(512)
    assert buckets == [(384, 704), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 384)]
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert max(width, height) / min(width, height) <= 2
        assert abs(width * height / 512**2 - 1) < 0.1  # about the same pixel count
    assert resolve_buckets("auto", 512) == buckets and resolve_buckets(None, 512) is None
    assert resolve_buckets([[40, 24], [32, 32]], 32) == [(32, 32), (40, 24)]
    for bad in ("square", [[32, 30]], [[0, 32]], 5):
        with pytest.raises(UserError, match="data.buckets"):
            resolve_buckets(bad, 32)


def test_images_go_to_the_nearest_aspect_ratio_and_never_upscale_when_asked():
    assert BUCKETS_32[nearest_bucket(400, 300, BUCKETS_32)] == (40, 24)  # 1.33 is nearer 1.67 than 1 (in log)
    assert BUCKETS_32[nearest_bucket(300, 290, BUCKETS_32)] == (32, 32)
    assert BUCKETS_32[nearest_bucket(100, 300, BUCKETS_32)] == (24, 40)  # 1:3 -> the tallest
    # 36 x 20 (wide) covers (32, 32)? no (20 < 32); (40, 24)? no (36 < 40): no bucket without upscaling
    assert nearest_bucket(36, 20, BUCKETS_32, no_upscale=True) is None
    # 38 x 26 is nearest (40, 24) but does not cover it: without upscaling, the smaller bucket it covers
    two_sizes = [(16, 16), (40, 24)]
    assert nearest_bucket(38, 26, two_sizes) == 1 and nearest_bucket(38, 26, two_sizes, no_upscale=True) == 0


def test_transform_crops_to_a_bucket_keeping_the_aspect_ratio():
    # a 80 x 40 image: left half red, right half blue, to a 40 x 24 bucket (aspect 1.67): the centre
    # 67 x 40 window is cut, so both colours survive, resized to (3, 24, 40)
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40, 0] = 255
    pixels[:, 40:, 2] = 255
    out = ImageTransform((40, 24), uint8=True)(Image.fromarray(pixels))
    assert out.shape == (3, 24, 40) and out.dtype == torch.uint8
    assert out[0, 12, 2] == 255 and out[2, 12, -3] == 255
    assert ImageTransform((40, 24)).size == 40  # the decoder keeps the long side


def test_header_size_follows_the_exif_orientation():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a phone portrait stored sideways
    Image.new("RGB", (60, 20)).save(buffer, format="JPEG", exif=exif.tobytes())
    assert header_size(buffer.getvalue()) == (20, 60)
    assert header_size(b"not an image") is None


def test_bucketed_sample_chooses_from_the_header_and_skips_small_images():
    wide = dict(good_sample("wide", size=(80, 40)))
    sample = BucketedSample(BUCKETS_32)({"__key__": "wide", **{k.split(".")[1]: v for k, v in wide.items()}}, None)
    assert sample["image"].shape == (3, 24, 40)
    small = {"__key__": "s", **{k.split(".")[1]: v for k, v in good_sample("s", size=(30, 20))}}
    assert BucketedSample(BUCKETS_32)(small, None)["image"].shape == (3, 24, 40)  # upscaled by default
    with pytest.raises(SkipSample) as skipped:
        BucketedSample(BUCKETS_32, no_upscale=True)(small, None)
    assert skipped.value.reason == TOO_SMALL


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> list[str]:
    """Two shards of 24 samples: wide (80 x 40), square (40 x 40) and tall (30 x 60) in turn."""
    directory = tmp_path_factory.mktemp("mixed")
    sizes = [(80, 40), (40, 40), (30, 60)]
    return [
        write_tar(
            directory / f"m{s}.tar", [m for j in range(24) for m in good_sample(f"m{s}-{j:02d}", size=sizes[j % 3])]
        )
        for s in range(2)
    ]


def _shape_of_key(key: str) -> tuple[int, int, int]:
    return {0: (3, 24, 40), 1: (3, 32, 32), 2: (3, 40, 24)}[int(key[-2:]) % 3]


def test_shard_streams_batch_one_bucket_at_a_time(mixed_shards):
    to_sample = BucketedSample(BUCKETS_32)
    train = ShardStream([Source(mixed_shards)], to_sample, 4, train=True, shuffle_buffer=10, seed=1)
    batches = list(itertools.islice(iter(train), 9))
    assert {tuple(b["image"].shape[1:]) for b in batches} == {(3, 24, 40), (3, 32, 32), (3, 40, 24)}
    for batch in batches:
        assert len(batch["key"]) == 4 and {_shape_of_key(k) for k in batch["key"]} == {tuple(batch["image"].shape[1:])}
    again = list(
        itertools.islice(
            iter(ShardStream([Source(mixed_shards)], to_sample, 4, train=True, shuffle_buffer=10, seed=1)), 9
        )
    )
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))
    # resuming from the position after 5 batches goes on with exactly the next ones: the samples of
    # other buckets that were waiting for a batch are read and decoded again, nothing else
    stream = ShardStream([Source(mixed_shards)], to_sample, 4, train=True, shuffle_buffer=10, seed=1)
    stream.start = StreamStart(0, 5, [batches[4][POSITION_KEY].state])
    assert batches[4][POSITION_KEY].state["pending"]  # (some were waiting)
    resumed = list(itertools.islice(iter(stream), 4))
    assert [b["key"] for b in resumed] == [b["key"] for b in batches[5:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, batches[5:]))
    # samples_per_epoch still gives every rank the same number of batches
    per_rank = [
        len(
            list(
                ShardStream(
                    [Source(mixed_shards[: rank + 1])],
                    to_sample,
                    4,
                    train=True,
                    shuffle_buffer=10,
                    samples_per_epoch=40,
                    rank=rank,
                    world_size=2,
                )
            )
        )
        for rank in (0, 1)
    ]
    assert per_rank == [5, 5]


def test_validation_keeps_each_buckets_last_partial_batch(mixed_shards):
    val = ShardStream([Source(mixed_shards)], BucketedSample(BUCKETS_32), 5, train=False)
    batches = list(val)
    assert sum(len(b["key"]) for b in batches) == 48  # each sample once
    sizes = sorted(len(b["key"]) for b in batches)
    assert sizes == [1, 1, 1] + [5] * 9  # 16 per bucket = 3 full batches + 1


def test_shard_datamodule_with_auto_buckets(mixed_shards):
    datamodule = ShardDataModule(
        shards=mixed_shards,
        image_size=32,
        batch_size=4,
        num_workers=0,
        buckets="auto",
        bucket_step=8,
        shuffle_buffer=10,
    )
    assert datamodule.buckets == auto_buckets(32, 8)
    datamodule.setup("fit")
    shapes = {tuple(b["image"].shape[2:]) for b in itertools.islice(iter(datamodule.train_dataloader()), 8)}
    assert shapes == {(24, 48), (32, 32), (48, 24)}  # 2:1, 1:1, 1:2 (the 30 x 60 portrait is 1:2)
