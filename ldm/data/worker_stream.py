"""One loader worker's training stream of raw samples, as a state machine whose state is small data.

The stream is what ``ldm.data.streams.ShardStream`` reads in training: for each source an endless
draw of shards with replacement (``SourceReader``), the sources mixed by weight, then a shuffle
buffer. Every raw sample carries a tag ``(source, draw, member, offset)``: which source, which of
that source's shard draws, which sample of that shard, and where in the file it starts (-1 where
unknown: a command or remote shard, a compressed one). ``WorkerStream.state()`` is then a few
numbers per source (the draw generator's state, the shard being read and how far), the generators
of the mix and the shuffle, and the tags of the samples in the shuffle buffer;
``WorkerStream.restore`` re-creates the stream there: the current shards re-opened at the sample
reached, the buffered samples read again (nothing decoded). For local shards both are seeks
(``read_shard(offset=...)``, ``read_samples_at``): a cost set by the buffer's size, never by how far
the stream had got; a remote shard is streamed again from its start to the last sample needed.

The order is the one webdataset's ``ResampledShards`` (deterministic, per-worker seed) and
``shuffle`` give, reproduced here with their exact generator calls, so a stream is the same
sequence whether or not it was interrupted.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import webdataset as wds

from ldm.data.seeds import MIX, SHARDS, SHUFFLE
from ldm.data.shards import Source
from ldm.data.skips import log
from ldm.errors import UserError

# a training source whose first this-many shard draws all fail is misconfigured: raise
MAX_FAILED_SHARDS = 16
# samples in the shuffle buffer before it starts yielding (it then grows to its full size)
SHUFFLE_INITIAL = 100

Tag = tuple[int, int, int, int]  # (source index, shard draw of it, sample index in the shard, byte offset or -1)
RawSample = dict[str, Any]
# (url, first sample, its byte offset or -1) -> that shard's raw samples from that one on (read, header-checked)
OpenShard = Callable[[str, int, int], Iterator[RawSample]]
# (url, byte offsets) -> {offset: the raw sample starting there} (local uncompressed shards)
ReadAt = Callable[[str, Sequence[int]], dict[int, RawSample]]


_UNREAD = object()  # a restored buffer element, read when it is picked


class NoReadableShard(UserError):
    """Not one shard of a training source could be read (credentials, paths, a missing tool)."""


def random_state(rng: random.Random) -> list[Any]:
    """A ``random.Random``'s state as plain lists (it travels between processes and into checkpoints)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng: random.Random, state: Sequence[Any]) -> random.Random:
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
    return rng


class SourceReader:
    """Samples of one source: shards drawn with replacement, read one after another.

    The draws are those of ``wds.ResampledShards(urls, worker_seed=lambda: seed, deterministic=True)``
    (its first epoch): ``random.Random(make_seed(seed, 0, 0))``, one ``randint`` per draw.
    """

    def __init__(self, source: Source, index: int, seed: int, open_shard: OpenShard, last_skip: Callable[[], tuple]):
        self.source = source
        self.index = index
        self.open_shard = open_shard
        self.last_skip = last_skip  # (reason, where, detail) of the latest counted skip, for the error
        self.rng = random.Random(wds.utils.make_seed(seed, 0, 0))
        self.draws = 0  # shards drawn so far; the current one is draw ``draws - 1``
        self.url: str | None = None  # the shard being read
        self.member = 0  # samples of it handed out
        self.offset = -1  # where the next of them starts in the file (-1: unknown)
        self.samples: Iterator[RawSample] | None = None
        self.failures, self.ever_read = 0, False
        self.urls_drawn: dict[int, str] = {}  # draw -> url, for the draws that buffered samples come from

    def next(self) -> tuple[Tag, RawSample]:
        """The next sample and its tag; fails loudly if no shard can ever be read, and backs off
        (rather than spinning) when many draws in a row fail after some worked."""
        while True:
            if self.samples is None:
                self.url = self.source.urls[self.rng.randint(0, len(self.source.urls) - 1)]
                self.urls_drawn[self.draws] = self.url
                self.draws += 1
                self.member, self.offset = 0, -1
                self.samples = self.open_shard(self.url, 0, -1)
            raw = next(self.samples, None)
            if raw is not None:
                self.member += 1
                self.offset = raw.get("__end__", -1)
                self.failures, self.ever_read = 0, True
                return (self.index, self.draws - 1, self.member - 1, raw.get("__offset__", -1)), raw
            read, self.samples = self.member > 0, None
            if read:
                continue
            self.failures += 1
            if self.failures >= MAX_FAILED_SHARDS:
                reason, where, detail = self.last_skip()
                if not self.ever_read:
                    raise NoReadableShard(
                        f"none of {self.failures} shards drawn from {self.source.describe()} could be read; "
                        f"last: {where}: {reason} {detail}"
                    )
                time.sleep(min(60.0, 2.0 ** (self.failures - MAX_FAILED_SHARDS)))

    def state(self) -> dict[str, Any]:
        return {
            "rng": random_state(self.rng),
            "draws": self.draws,
            "url": self.url,
            "member": self.member,
            "offset": self.offset,
            "failures": self.failures,
            "ever_read": self.ever_read,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the current shard re-opened at the sample reached (a shard read to
        its end is simply done: the next call draws the next one)."""
        set_random_state(self.rng, state["rng"])
        self.draws, self.url, self.member = int(state["draws"]), state["url"], int(state["member"])
        self.offset = int(state.get("offset", -1))
        self.failures, self.ever_read = int(state["failures"]), bool(state["ever_read"])
        self.samples = self.open_shard(self.url, self.member, self.offset) if self.url is not None else None
        if self.url is not None:
            self.urls_drawn[self.draws - 1] = self.url


class WorkerStream:
    """Raw training samples of one loader worker: sources mixed by weight, then shuffled.

    seed: ``purpose, ... -> seed`` for this worker (``ldm.data.seeds``; the stream derives it from the run
    seed, rank, worker and epoch): ``(SHARDS, i)`` draws source i's shards, ``MIX`` mixes, ``SHUFFLE`` shuffles.
    shuffle_buffer: raw samples held for shuffling (<= 1: off), webdataset's ``shuffle(bufsize,
    initial=min(100, bufsize))``.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        seed: Callable[..., int],
        open_shard: OpenShard,
        shuffle_buffer: int,
        last_skip: Callable[[], tuple],
        read_at: ReadAt | None = None,
    ):
        self.open_shard = open_shard
        self.read_at = read_at
        self.readers = [
            SourceReader(source, i, seed(SHARDS, i), open_shard, last_skip) for i, source in enumerate(sources)
        ]
        self.weights = list(itertools.accumulate(source.weight for source in sources))
        self.mix_rng = random.Random(seed(MIX))  # drawn only with several sources
        self.buffer_size = shuffle_buffer if shuffle_buffer > 1 else 0
        self.initial = min(SHUFFLE_INITIAL, self.buffer_size)
        self.shuffle_rng = random.Random(seed(SHUFFLE))
        self.buffer: list[RawSample] = []
        self.tags: list[Tag] = []  # the buffer's tags, in the buffer's order
        self.exhausted = False
        self.emitted = 0  # samples handed out: the index each one's decoding generator is seeded by
        self.unreadable: list[str] = []  # restored samples that could not be read again

    # ---------------------------------------------------------------- the stream
    def _mixed(self) -> tuple[Tag, RawSample]:
        """The next sample of the mix (webdataset's ``RandomMix``, with a seeded generator)."""
        if len(self.readers) == 1:
            return self.readers[0].next()
        index = bisect.bisect_right(self.weights, self.mix_rng.random() * self.weights[-1])
        return self.readers[min(index, len(self.readers) - 1)].next()

    def next(self) -> tuple[int, Tag, RawSample]:
        """(index of the sample in this stream, its tag, the raw sample); StopIteration at the end."""
        tag, raw = self._shuffled()
        self.emitted += 1
        return self.emitted - 1, tag, raw

    def _shuffled(self) -> tuple[Tag, RawSample]:
        if not self.buffer_size:
            return self._mixed()
        # webdataset's _shuffle, one output per call: take a sample, a second one while the buffer
        # is below its size, and hand out a random one once it holds ``initial``
        while not self.exhausted:
            try:
                self._push(*self._mixed())
            except StopIteration:
                self.exhausted = True
                break
            if len(self.buffer) < self.buffer_size:
                try:
                    self._push(*self._mixed())
                except StopIteration:
                    self.exhausted = True
            if len(self.buffer) >= self.initial and (picked := self._pick()) is not None:
                return picked
        while self.buffer:
            if (picked := self._pick()) is not None:
                return picked
        raise StopIteration

    def _push(self, tag: Tag, raw: RawSample) -> None:
        self.buffer.append(raw)
        self.tags.append(tag)

    def _pick(self) -> tuple[Tag, RawSample] | None:
        """webdataset's ``pick``: a random element, replaced by the last one. A restored element not
        read yet is read now (None if it no longer can be: the stream goes on without it)."""
        k = self.shuffle_rng.randint(0, len(self.buffer) - 1)
        raw, tag = self.buffer[k], self.tags[k]
        self.buffer[k], self.tags[k] = self.buffer[-1], self.tags[-1]
        self.buffer.pop()
        self.tags.pop()
        if raw is _UNREAD:
            raw = self._read_again(tag)
            if raw is None:
                return None
        return tag, raw

    def _read_again(self, tag: Tag) -> RawSample | None:
        url = self.readers[tag[0]].urls_drawn.get(tag[1])
        raw = self.read_at(url, [tag[3]]).get(tag[3]) if url is not None and self.read_at is not None else None
        if raw is None:
            self.unreadable.append(f"{url}@{tag[3]}")
            if len(self.unreadable) <= 3:
                log.warning(
                    "data: resuming: the buffered sample at byte %s of %s cannot be read again; the stream "
                    "goes on without it (not bit-identical)",
                    tag[3],
                    url,
                )
        return raw

    # ---------------------------------------------------------------- state
    def state(self, also_referenced: Sequence[Tag] = ()) -> dict[str, Any]:
        """Everything needed to continue here; ``also_referenced``: tags the caller keeps (samples
        waiting for a batch) whose shards must stay nameable."""
        referenced = {(tag[0], tag[1]) for tag in itertools.chain(self.tags, also_referenced)}
        shard_urls = []
        for reader in self.readers:
            mine = {j for s, j in referenced if s == reader.index}
            oldest = min(mine, default=reader.draws - 1)
            for j in [j for j in reader.urls_drawn if j < oldest]:
                del reader.urls_drawn[j]  # no buffered sample comes from it any more
            shard_urls.append([[j, reader.urls_drawn[j]] for j in sorted(mine)])
        return {
            "readers": [reader.state() for reader in self.readers],
            "mix_rng": random_state(self.mix_rng),
            "shuffle_rng": random_state(self.shuffle_rng),
            "buffer": [list(tag) for tag in self.tags],
            "shard_urls": shard_urls,  # per source: [draw, url] of every draw a kept tag names
            "exhausted": self.exhausted,
            "emitted": self.emitted,
        }

    def restore(self, state: dict[str, Any]) -> list[str]:
        """Continue from ``state`` (a ``state()`` of the same sources); returns a line per shard whose
        buffered samples could not all be read again (the stream goes on without them)."""
        for reader, reader_state, pairs in zip(self.readers, state["readers"], state["shard_urls"]):
            reader.restore(reader_state)
            reader.urls_drawn.update({int(j): url for j, url in pairs})
        set_random_state(self.mix_rng, state["mix_rng"])
        set_random_state(self.shuffle_rng, state["shuffle_rng"])
        self.exhausted, self.emitted = bool(state["exhausted"]), int(state["emitted"])
        tags = [tuple(int(x) for x in tag) for tag in state["buffer"]]  # type: ignore[misc]
        # samples of local shards are read when they are picked (a seek each: the first batch waits
        # for its own samples only); the others now, streamed shard by shard
        lazy = self.read_at is not None
        found, problems = self.fetch([tag for tag in tags if not (lazy and tag[3] >= 0)], state["shard_urls"])
        kept = [tag for tag in tags if (lazy and tag[3] >= 0) or tag in found]
        self.buffer, self.tags = [found.get(tag, _UNREAD) for tag in kept], kept
        return problems

    def fetch(
        self, tags: Sequence[Tag], shard_urls: Sequence[Sequence[Sequence[Any]]]
    ) -> tuple[dict[Tag, RawSample], list[str]]:
        """The raw samples of ``tags``, read again from their shards (``shard_urls`` as in ``state()``):
        by their offsets where every one of a shard has one, else each shard once, from its first
        wanted sample to its last."""
        urls = {(s, int(j)): url for s, pairs in enumerate(shard_urls) for j, url in pairs}
        wanted: dict[tuple[int, int], list[Tag]] = {}
        for tag in tags:
            wanted.setdefault((tag[0], tag[1]), []).append(tag)
        found: dict[Tag, RawSample] = {}
        problems = []
        for (s, j), shard_tags in sorted(wanted.items()):
            url = urls.get((s, j))
            if url is not None and self.read_at is not None and all(tag[3] >= 0 for tag in shard_tags):
                at = self.read_at(url, [tag[3] for tag in shard_tags])
                found.update({tag: at[tag[3]] for tag in shard_tags if tag[3] in at})
            elif url is not None:
                members = {tag[2]: tag for tag in shard_tags}
                first, last = min(members), max(members)
                samples = self.open_shard(url, first, -1)
                try:
                    for m, raw in enumerate(samples, start=first):
                        if m in members:
                            found[members[m]] = raw
                        if m >= last:
                            break
                finally:
                    getattr(samples, "close", lambda: None)()  # the shard's file or command, now
            missing = sum(tag not in found for tag in shard_tags)
            if missing:
                problems.append(f"{missing} of {len(shard_tags)} samples of {url or f'draw {j} of source {s}'}")
        return found, problems
