"""Why samples and shards are skipped, and the per-worker counts that travel with each batch.

Every sample the pipeline drops is counted under one key: ``skipped/<reason>`` (bad data) or
``filtered/<filter>`` (a metadata threshold, see ``ldm.data.metadata``). A sample that is kept but
cut to a limit is counted under ``truncated/<what>`` (``truncated/caption``: over max_caption_chars). Sample-level reasons count
samples; shard-level reasons count shards (the samples of a shard that could not be read are not
known, so they are not counted). Each loader worker keeps its own ``DataCounts`` and hands what
accrued since the previous batch to the batch it builds (``batch["skipped"]``); the training side
sums these deltas (``ldm.training.data_stats.DataSkipReport``), so counts cross process boundaries
with the batches themselves: no shared memory, no locks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping

log = logging.getLogger("ldm.data")

# The batch key that carries the counts: {"skipped/<reason>" | "filtered/<filter>" | "truncated/<what>": n
# since the last batch}
COUNTS_KEY = "skipped"

# The one vocabulary of bad data: the loaders (image, latent and folder streams) count under these names,
# data_scripts/images_to_shards.py skips its inputs under them, and data_scripts/inspect_shards.py reports
# what a loader would skip under them. Who reports each is in brackets ([all]: loaders and both tools).
# sample-level reasons (count samples)
NO_IMAGE = "no_image"  # no .jpg/.jpeg/.png/.webp member, or a listed file of another type [loaders, inspect_shards]
EMPTY_IMAGE = "empty_image"  # a zero-byte image member or file [all]
CORRUPT_IMAGE = "corrupt_image"  # the bytes do not decode (unknown format, truncated, garbage) [all]
TOO_MANY_PIXELS = (
    "too_many_pixels"  # header width x height over max_pixels (or PIL's bomb limit: the tools know only that one) [all]
)
TOO_SMALL = "too_small"  # short side under image_size with small_images=skip, or under every bucket [loaders]
EMPTY_CAPTION = "empty_caption"  # no non-empty caption, empty_captions=drop [loaders, inspect_shards; images_to_shards: a missing one]
CORRUPT_CAPTION = "corrupt_caption"  # a caption that is not UTF-8 (loaders read it with U+FFFD replacements) [inspect_shards, images_to_shards]
CORRUPT_METADATA = (
    "corrupt_metadata"  # an unparsable (or too deeply nested) .json or metadata row, or a row naming no image [all]
)
OVERSIZED_MEMBER = "oversized_member"  # a member whose tar header declares over max_member_bytes (never read) [loaders, inspect_shards]
EMPTY_MEMBER = (
    "empty_member"  # a zero-byte member other than image, caption and .json (loaders ignore it) [inspect_shards]
)
UNSAFE_PATH = "unsafe_path"  # a metadata file_name resolving outside the folder [folder loader]
MISSING_FILE = (
    "missing_file"  # a listed image (or an existing caption file) that cannot be read [folder loader, images_to_shards]
)
OVERSIZED_FILE = "oversized_file"  # an image file over the folder loader's MAX_FILE_BYTES (never read) [folder loader]
QUARANTINED = "quarantined"  # its key is in the quarantine list (a worker died on it; ldm.data.quarantine) [loaders]
CORRUPT_LATENT = (
    "corrupt_latent"  # a latent shard's .npy member missing, unloadable, misshapen or non-finite [latent loader]
)
ERROR = "error"  # any other exception while turning a sample into tensors [loaders]
# shard-level reasons (count shards)
UNREADABLE_SHARD = (
    "unreadable_shard"  # could not be opened, or not a tar at all (nothing read) [loaders, inspect_shards]
)
TRUNCATED_SHARD = (
    "truncated_shard"  # ended early; its complete samples are kept, the last is dropped [loaders, inspect_shards]
)
STALLED_SHARD = "stalled_shard"  # a read (pipe, remote or local file) sent no byte for read_timeout seconds [loaders, inspect_shards]
NOT_LATENT_SHARD = (
    "not_latent_shard"  # a latent shard that does not open with a readable __meta__ header [latent loader]
)
FOREIGN_LATENT_SHARD = "foreign_latent_shard"  # its __meta__ says another VAE/text encoder/size made it than the first shard's [latent loader]
# kept but cut (count samples, under truncated/<what>)
CAPTION = "caption"  # a caption longer than max_caption_chars, cut to it [loaders]

SAMPLE_REASONS = (
    NO_IMAGE,
    EMPTY_IMAGE,
    CORRUPT_IMAGE,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    EMPTY_CAPTION,
    CORRUPT_CAPTION,
    CORRUPT_METADATA,
    OVERSIZED_MEMBER,
    EMPTY_MEMBER,
    UNSAFE_PATH,
    MISSING_FILE,
    OVERSIZED_FILE,
    QUARANTINED,
    CORRUPT_LATENT,
    ERROR,
)
SHARD_REASONS = (UNREADABLE_SHARD, TRUNCATED_SHARD, STALLED_SHARD, NOT_LATENT_SHARD, FOREIGN_LATENT_SHARD)

# warnings printed per reason and process before going quiet (the counts keep going)
WARNINGS_PER_REASON = 3


class SkipSample(Exception):
    """Raised while decoding a sample that must be dropped; ``reason`` is one of the names above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FilteredOut(Exception):
    """Raised for a sample that a metadata filter rejects; ``name`` is the filter (e.g. min_aesthetic)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class DataCounts:
    """Skip and filter counts of one process (one loader worker, or the main process).

    ``take()`` returns what accrued since its previous call and starts again from zero, so that each
    batch carries a delta and summing the deltas of every batch gives the totals.
    """

    def __init__(self, on_skip: Callable[[str, str, str], None] | None = None) -> None:
        self._pending: Counter[str] = Counter()
        self._warned: Counter[str] = Counter()
        self.last_skip: tuple[str, str, str] = ("", "", "")  # (reason, where, detail) of the latest skip
        # called with (reason, where, detail) of every skip instead of the warnings (a report that lists them)
        self._on_skip = on_skip

    def skip(self, reason: str, where: str = "", detail: str = "") -> None:
        """Count one skipped sample (or shard) and warn about the first few of each reason (or hand
        each to ``on_skip``)."""
        self._pending[f"skipped/{reason}"] += 1
        self.last_skip = (reason, where, detail)
        if self._on_skip is not None:
            self._on_skip(reason, where, detail)
        else:
            self._warn(reason, where, detail)

    def filtered(self, name: str) -> None:
        """Count one sample rejected by the metadata filter ``name``."""
        self._pending[f"filtered/{name}"] += 1

    def truncated(self, what: str) -> None:
        """Count one sample kept with ``what`` (e.g. its caption) cut to a limit."""
        self._pending[f"truncated/{what}"] += 1

    def take(self) -> dict[str, int]:
        """The counts since the previous ``take()``, then reset."""
        delta = dict(self._pending)
        self._pending.clear()
        return delta

    def _warn(self, reason: str, where: str, detail: str) -> None:
        self._warned[reason] += 1
        seen = self._warned[reason]
        if seen <= WARNINGS_PER_REASON:
            more = " (further ones are only counted)" if seen == WARNINGS_PER_REASON else ""
            log.warning("data: skipped %s (%s)%s%s", where or "?", reason, f": {detail}" if detail else "", more)


def add_counts(total: Counter[str], delta: Mapping[str, int] | None) -> None:
    """Add a batch's counts to ``total`` in place (``delta`` may be None: batches of other datasets)."""
    for key, value in (delta or {}).items():
        total[key] += int(value)
