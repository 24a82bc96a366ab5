"""A sample's caption from candidate keys tried in order.

A key is a member extension (``txt``: the ``.txt`` member), optionally followed by a dotted path
into that member parsed as JSON (``json.caption``: the ``caption`` field of the ``.json`` member;
``json.meta.alt``: a nested field). The first key giving a non-empty caption wins.

Several captions per sample: a JSON value that is a list gives one element drawn at random for each
use of the sample (the empty ones left out), a common way to store alternative captions. A ``.txt``
member is always one caption: LAION alt-texts do contain line breaks, so lines are not treated as
alternatives; all whitespace runs (line breaks included) become single spaces.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ldm.data.metadata import SampleMembers
from ldm.data.skips import EMPTY_CAPTION, SkipSample

EMPTY_CAPTIONS = ("drop", "keep")


def _clean(text: str) -> str:
    return " ".join(text.split())


class CaptionPicker:
    """Pick the caption of a raw sample.

    keys: candidate keys, tried in order (see the module docstring).
    empty: what to do when no key gives a non-empty caption: ``drop`` the sample (raises
        ``SkipSample("empty_caption")``) or ``keep`` it with the caption "".
    """

    def __init__(self, keys: Sequence[str] = ("txt",), empty: str = "drop"):
        if isinstance(keys, str):
            keys = [keys]
        if not keys:
            raise ValueError("caption_keys needs at least one key, e.g. [txt]")
        if empty not in EMPTY_CAPTIONS:
            raise ValueError(f"empty_captions must be one of {EMPTY_CAPTIONS}, not {empty!r}")
        self.keys = [(key.split(".")[0], tuple(key.split(".")[1:])) for key in keys]
        self.empty = empty

    @property
    def members(self) -> set[str]:
        """The member extensions the keys read."""
        return {member for member, _ in self.keys}

    def __call__(self, members: SampleMembers, rng: random.Random) -> str:
        for member, path in self.keys:
            if path:
                value: Any = members.json(member)
                for field in path:
                    value = value.get(field) if isinstance(value, dict) else None
            else:
                value = members.text(member)
            caption = _choose(value, rng)
            if caption:
                return caption
        if self.empty == "keep":
            return ""
        raise SkipSample(EMPTY_CAPTION)


def _choose(value: Any, rng: random.Random) -> str | None:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, (list, tuple)):
        options = [_clean(v) for v in value if isinstance(v, str) and v.strip()]
        return rng.choice(options) if options else None
    return None
