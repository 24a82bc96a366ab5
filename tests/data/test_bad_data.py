"""Bad samples and bad shards are skipped and counted by reason; the pipeline goes on."""

import itertools
import random
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from ldm.data.captions import CaptionPicker
from ldm.data.metadata import MetadataFilter
from ldm.data.samples import ToTrainingSample
from ldm.data.shards import Source
from ldm.data.streams import ImageCaptionStream, NoReadableShard
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError
from shard_corpus import bad_corpus, write_good_shard


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_corpus(tmp_path_factory.mktemp("bad"))


def _to_sample() -> ToTrainingSample:
    filters = MetadataFilter(max_unsafe=0.5)
    return ToTrainingSample(ImageTransform(8), CaptionPicker(["txt"]), filters, max_pixels=1_000_000)


def _validation(urls, batch_size=4, **options) -> ImageCaptionStream:
    return ImageCaptionStream([Source(urls)], _to_sample(), batch_size, train=False, read_timeout=0.5, **options)


def _drain(batches) -> tuple[list[str], Counter]:
    keys, counts = [], Counter()
    for batch in batches:
        assert batch["image"].shape[1:] == (3, 8, 8) and len(batch["caption"]) == len(batch["key"])
        keys.extend(batch["key"])
        counts.update(batch["skipped"])
    return keys, counts


def test_every_good_sample_arrives_and_every_bad_one_is_counted(corpus):
    urls, good, expected = corpus
    keys, counts = _drain(_validation(urls))
    assert sorted(keys) == sorted(good)  # each good sample exactly once
    assert dict(counts) == expected


def test_counts_travel_with_the_batches_of_worker_processes(corpus):
    urls, good, expected = corpus
    loader = DataLoader(_validation(urls), batch_size=None, num_workers=2)
    keys, counts = _drain(loader)
    assert sorted(keys) == sorted(good) and dict(counts) == expected


def test_training_stream_goes_on_past_bad_shards(corpus):
    urls, good, expected = corpus
    fast = [url for url in urls if "sleep" not in url]  # (the stalled pipe costs 0.5 s a draw)
    stream = ImageCaptionStream([Source(fast)], _to_sample(), 4, train=True, shuffle_buffer=8, read_timeout=0.5)
    keys, counts = _drain(itertools.islice(iter(stream), 25))
    assert len(keys) == 100 and set(keys) <= good
    assert set(counts) <= set(expected) and counts["skipped/unreadable_shard"] > 0


def test_a_source_with_no_readable_shard_fails_with_a_clear_error(tmp_path):
    stream = ImageCaptionStream([Source([str(tmp_path / "gone-1.tar"), str(tmp_path / "gone-2.tar")], spec="gone-*")],
                                _to_sample(), 4, train=True)
    with pytest.raises(NoReadableShard, match=r"none of 16 shards drawn from gone-\* could be read.*gone-") as error:
        next(iter(stream))
    assert isinstance(error.value, UserError)


def test_unexpected_errors_are_counted_but_a_systematic_one_is_raised(tmp_path):
    shard = write_good_shard(tmp_path / "s.tar", [f"s{i:03d}" for i in range(120)])
    decode = _to_sample()

    def sometimes_broken(sample, rng: random.Random):
        if sample["__key__"] in ("s003", "s007"):
            raise RuntimeError("a bug that only some samples trigger")
        return decode(sample, rng)

    keys, counts = _drain(ImageCaptionStream([Source([shard])], sometimes_broken, 8, train=False))
    assert len(keys) == 118 and dict(counts) == {"skipped/error": 2}

    def always_broken(sample, rng):
        raise RuntimeError("a bug that every sample triggers")

    with pytest.raises(RuntimeError, match="every sample"):
        list(ImageCaptionStream([Source([shard])], always_broken, 8, train=False))
