"""Bad samples and bad shards are skipped and counted by reason; the pipeline goes on."""

import itertools
import json
import multiprocessing
import os
import random
import signal
from collections import Counter
from pathlib import Path

import pytest
from shard_corpus import bad_corpus, good_sample, image_bytes, write_good_shard, write_tar
from torch.utils.data import DataLoader

from ldm.data.captions import DEFAULT_MAX_CAPTION_CHARS, CaptionPicker
from ldm.data.metadata import MetadataFilter, SampleMembers
from ldm.data.quarantine import Quarantine
from ldm.data.samples import ToTrainingSample
from ldm.data.shards import Source
from ldm.data.streams import ShardStream
from ldm.data.transforms import ImageTransform
from ldm.data.worker_stream import NoReadableShard
from ldm.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_corpus(tmp_path_factory.mktemp("bad"))


def _to_sample() -> ToTrainingSample:
    filters = MetadataFilter(max_unsafe=0.5)
    return ToTrainingSample(ImageTransform(8), CaptionPicker(["txt"]), filters, max_pixels=1_000_000)


def _validation(urls, batch_size=4, **options) -> ShardStream:
    return ShardStream([Source(urls)], _to_sample(), batch_size, train=False, read_timeout=0.5, **options)


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
    stream = ShardStream([Source(fast)], _to_sample(), 4, train=True, shuffle_buffer=8, read_timeout=0.5)
    keys, counts = _drain(itertools.islice(iter(stream), 25))
    assert len(keys) == 100 and set(keys) <= good
    assert set(counts) <= set(expected) and counts["skipped/unreadable_shard"] > 0


def test_a_source_with_no_readable_shard_fails_with_a_clear_error(tmp_path):
    stream = ShardStream(
        [Source([str(tmp_path / "gone-1.tar"), str(tmp_path / "gone-2.tar")], spec="gone-*")],
        _to_sample(),
        4,
        train=True,
    )
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

    keys, counts = _drain(ShardStream([Source([shard])], sometimes_broken, 8, train=False))
    assert len(keys) == 118 and dict(counts) == {"skipped/error": 2}

    def always_broken(sample, rng):
        raise RuntimeError("a bug that every sample triggers")

    with pytest.raises(RuntimeError, match="every sample"):
        list(ShardStream([Source([shard])], always_broken, 8, train=False))


def test_deeply_nested_json_is_corrupt_metadata_and_never_ends_the_stream(tmp_path):
    nested = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError
    members = [
        m
        for i in range(120)
        for m in ((f"n{i:03d}.png", image_bytes()), (f"n{i:03d}.txt", b"a caption"), (f"n{i:03d}.json", nested))
    ]
    shard = write_tar(tmp_path / "nested.tar", members + good_sample("z000", meta={"punsafe": 0.1}))
    keys, counts = _drain(_validation([shard]))  # (the max_unsafe filter parses every .json)
    assert keys == ["z000"] and dict(counts) == {"skipped/corrupt_metadata": 120}


def test_a_huge_caption_is_cut_to_the_cap_and_counted(tmp_path):
    huge = ("word " * 800_000).encode()  # 4 MB
    shard = write_tar(tmp_path / "long.tar", [("h0.png", image_bytes()), ("h0.txt", huge), *good_sample("h1")])
    stream = _validation([shard])
    batches = list(stream)
    captions = [c for batch in batches for c in batch["caption"]]
    assert len(captions[0]) <= DEFAULT_MAX_CAPTION_CHARS and captions[0].startswith("word word")
    assert captions[1] == "caption h1"
    assert sum((Counter(batch["skipped"]) for batch in batches), Counter()) == {"truncated/caption": 1}
    picker = CaptionPicker(["txt"], max_chars=13)
    assert picker.pick(SampleMembers({"txt": b"  short \n caption  "}), random.Random(0)) == ("short caption", False)
    assert picker.pick(SampleMembers({"txt": b"one two three four"}), random.Random(0)) == ("one two three", True)
    assert (
        CaptionPicker(["txt"], max_chars=None)(SampleMembers({"txt": huge}), random.Random(0)) == huge.decode().strip()
    )


class _DiesOn:
    """An image transform that kills its process on images of one size, as a decoder segfault would."""

    def __init__(self, size: tuple[int, int]):
        self.inner, self.poison = ImageTransform(8), size
        self.size = self.inner.size

    def __call__(self, image, rng=None):
        if image.size == self.poison:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(image, rng)


def _attempt(shard: str, quarantine: Path, out: Path) -> None:
    to_sample = ToTrainingSample(_DiesOn((13, 11)), CaptionPicker(["txt"]), quarantine=Quarantine(quarantine))
    keys, counts = _drain(ShardStream([Source([shard])], to_sample, 2, train=False))
    out.write_text(json.dumps({"keys": keys, "counts": counts}))


def test_a_sample_that_kills_its_worker_is_quarantined_by_the_next_attempts(tmp_path):
    keys = [f"q{i:03d}" for i in range(8)]
    members = [m for key in keys for m in good_sample(key)]
    members[6:8] = [("q003.png", image_bytes((13, 11))), ("q003.txt", b"the poison sample")]
    shard, directory, out = write_tar(tmp_path / "q.tar", members), tmp_path / "quarantine", tmp_path / "out.json"
    fork = multiprocessing.get_context("fork")

    def attempt() -> int:
        process = fork.Process(target=_attempt, args=(shard, directory, out))
        process.start()
        process.join(60)
        return process.exitcode

    assert attempt() == -signal.SIGKILL  # dies on q003
    assert attempt() == -signal.SIGKILL  # one death might have been a preemption: q003 is not skipped yet
    crashes = [json.loads(line) for line in (directory / "crashes.jsonl").read_text().splitlines()]
    assert [(c["url"], c["key"]) for c in crashes] == [(shard, "q003")]
    assert attempt() == 0  # two deaths on q003: it is quarantined
    result = json.loads(out.read_text())
    assert result["keys"] == [k for k in keys if k != "q003"] and result["counts"] == {"skipped/quarantined": 1}
    assert [json.loads(line) for line in (directory / "quarantine.jsonl").read_text().splitlines()] == [
        {"url": shard, "key": "q003"}
    ]
    assert attempt() == 0 and len((directory / "crashes.jsonl").read_text().splitlines()) == 2  # a clean run logs none


def test_a_quarantine_list_written_by_hand_skips_keys_in_any_shard(tmp_path):
    shard = write_good_shard(tmp_path / "s.tar", ["k0", "k1", "k2"])
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "quarantine.jsonl").write_text('{"key": "k1"}\n{"url": "elsewhere.tar", "key": "k2"}\n')
    to_sample = ToTrainingSample(ImageTransform(8), quarantine=Quarantine(tmp_path / "quarantine"))
    keys, counts = _drain(ShardStream([Source([shard])], to_sample, 2, train=False))
    assert keys == ["k0", "k2"] and dict(counts) == {"skipped/quarantined": 1}
