"""A sample's caption from candidate keys tried in order.

A key is a member extension (``txt``: the ``.txt`` member), optionally followed by a dotted path
into that member parsed as JSON (``json.caption``: the ``caption`` field of the ``.json`` member;
``json.meta.alt``: a nested field). The first key giving a non-empty caption wins.

Several captions per sample: a JSON value that is a list gives one element drawn at random for each
use of the sample (the empty ones left out), a common way to store alternative captions. A ``.txt``
member is always one caption: LAION alt-texts do contain line breaks, so lines are not treated as
alternatives; all whitespace runs (line breaks included) become single spaces.

Captions are untrusted: one longer than ``max_chars`` (after the whitespace is folded) is cut to
``max_chars`` and the cut is reported (``pick``), so that a 4 MB caption costs the tokenizer no more
than a long one. Only the first ``RAW_CHARS_PER_CHAR x max_chars`` characters of a value are ever
cleaned, so the cost is bounded whatever the member's size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ldm.data.metadata import SampleMembers
from ldm.data.skips import EMPTY_CAPTION, SkipSample

EMPTY_CAPTIONS = ("drop", "keep")
# CLIP reads 77 tokens (some 300-400 characters of English); 2048 keeps the longest real captions
# (dense synthetic ones) whole, for encoders with longer contexts
DEFAULT_MAX_CAPTION_CHARS = 2048
# characters of a raw value examined per character kept (room for folded whitespace runs)
RAW_CHARS_PER_CHAR = 8


def _clean(text: str, max_chars: int | None = None) -> tuple[str, bool]:
    """Fold whitespace runs to single spaces and cut to ``max_chars``: (caption, whether it was cut)."""
    if max_chars is None:
        return " ".join(text.split()), False
    raw = text[: RAW_CHARS_PER_CHAR * max_chars]
    caption = " ".join(raw.split())
    cut = len(caption) > max_chars or (len(raw) < len(text) and bool(text[len(raw) :].strip()))
    return caption[:max_chars].rstrip(), cut


class CaptionPicker:
    """Pick the caption of a raw sample.

    keys: candidate keys, tried in order (see the module docstring).
    empty: what to do when no key gives a non-empty caption: ``drop`` the sample (raises
        ``SkipSample("empty_caption")``) or ``keep`` it with the caption "".
    max_chars: captions are cut to this many characters (None: no limit; see the module docstring).
    """

    def __init__(
        self, keys: Sequence[str] = ("txt",), empty: str = "drop", max_chars: int | None = DEFAULT_MAX_CAPTION_CHARS
    ):
        if isinstance(keys, str):
            keys = [keys]
        if not keys:
            raise ValueError("caption_keys needs at least one key, e.g. [txt]")
        if empty not in EMPTY_CAPTIONS:
            raise ValueError(f"empty_captions must be one of {EMPTY_CAPTIONS}, not {empty!r}")
        if max_chars is not None and max_chars < 1:
            raise ValueError(f"max_caption_chars must be positive or null, not {max_chars}")
        self.keys = [(key.split(".")[0], tuple(key.split(".")[1:])) for key in keys]
        self.empty = empty
        self.max_chars = max_chars

    @property
    def members(self) -> set[str]:
        """The member extensions the keys read."""
        return {member for member, _ in self.keys}

    def __call__(self, members: SampleMembers, rng: random.Random) -> str:
        return self.pick(members, rng)[0]

    def pick(self, members: SampleMembers, rng: random.Random) -> tuple[str, bool]:
        """(the caption, whether it was cut to ``max_chars``)."""
        for member, path in self.keys:
            if path:
                value: Any = members.json(member)
                for field in path:
                    value = value.get(field) if isinstance(value, dict) else None
            else:
                value = members.text(member)
            caption = _choose(value, rng, self.max_chars)
            if caption and caption[0]:
                return caption
        if self.empty == "keep":
            return "", False
        raise SkipSample(EMPTY_CAPTION)


def _choose(value: Any, rng: random.Random, max_chars: int | None) -> tuple[str, bool] | None:
    if isinstance(value, str):
        return _clean(value, max_chars)
    if isinstance(value, (list, tuple)):
        options = [v for v in value if isinstance(v, str) and v.strip()]
        return _clean(rng.choice(options), max_chars) if options else None
    return None
