"""Caption choice from candidate keys, and thresholds on img2dataset metadata."""

import json
import random

import pytest

from ldm.data.captions import CaptionPicker
from ldm.data.metadata import MetadataFilter, SampleMembers
from ldm.data.skips import FilteredOut, SkipSample


def _members(**members) -> SampleMembers:
    encoded = {k: (json.dumps(v) if k == "json" and not isinstance(v, (str, bytes)) else v) for k, v in members.items()}
    return SampleMembers({"__key__": "k", **{k: v.encode() if isinstance(v, str) else v for k, v in encoded.items()}})


def test_keys_are_tried_in_order():
    picker = CaptionPicker(["txt", "json.caption", "json.text"])
    rng = random.Random(0)
    assert picker(_members(txt="from txt", json={"caption": "from json"}), rng) == "from txt"
    assert picker(_members(txt="  ", json={"caption": "from json"}), rng) == "from json"
    assert picker(_members(json={"caption": "", "text": "from text"}), rng) == "from text"
    assert CaptionPicker(["json.meta.alt"])(_members(json={"meta": {"alt": "nested"}}), rng) == "nested"
    assert CaptionPicker(["caption"])(_members(caption="another member"), rng) == "another member"


def test_whitespace_is_normalised_and_txt_is_one_caption():
    picker = CaptionPicker(["txt"])
    assert picker(_members(txt=" a  red\ncircle\t\n"), random.Random(0)) == "a red circle"


def test_a_list_gives_a_random_choice_per_use():
    picker = CaptionPicker(["json.captions"])
    members = _members(json={"captions": ["first", "", "second", 3, "third"]})
    rng = random.Random(0)
    chosen = [picker(members, rng) for _ in range(200)]
    assert set(chosen) == {"first", "second", "third"}
    assert chosen == [picker(members, r) for r in [random.Random(0)] for _ in range(200)]  # seeded
    only_empty = _members(json={"captions": ["", " "]}, txt="fallback")
    assert CaptionPicker(["json.captions", "txt"])(only_empty, rng) == "fallback"


def test_empty_captions_are_dropped_or_kept():
    with pytest.raises(SkipSample) as skip:
        CaptionPicker(["txt", "json.caption"], empty="drop")(_members(txt=""), random.Random(0))
    assert skip.value.reason == "empty_caption"
    assert CaptionPicker(["txt"], empty="keep")(_members(), random.Random(0)) == ""
    with pytest.raises(ValueError, match="empty_captions"):
        CaptionPicker(["txt"], empty="sometimes")


def test_unparsable_json_is_corrupt_metadata_only_when_needed():
    members = _members(txt="fine", json="{broken")
    assert CaptionPicker(["txt", "json.caption"])(members, random.Random(0)) == "fine"  # never reached
    with pytest.raises(SkipSample) as skip:
        CaptionPicker(["json.caption", "txt"])(members, random.Random(0))
    assert skip.value.reason == "corrupt_metadata"


@pytest.mark.parametrize(
    "thresholds, metadata, rejected_by",
    [
        ({"min_size": 256}, {"original_width": 300, "original_height": 200, "width": 512, "height": 512}, "min_size"),
        ({"min_size": 256}, {"width": 300, "height": 260}, None),  # no original_*: the stored size
        ({"max_aspect_ratio": 2.0}, {"original_width": 1000, "original_height": 400}, "max_aspect_ratio"),
        ({"max_aspect_ratio": 2.0}, {"original_width": 400, "original_height": 300}, None),
        ({"min_aesthetic": 5.0}, {"aesthetic": 4.9}, "min_aesthetic"),
        ({"min_aesthetic": 5.0}, {"AESTHETIC_SCORE": "5.5"}, None),  # numbers in strings count
        ({"min_aesthetic": 5.0}, {"AESTHETIC_SCORE": 4.0}, "min_aesthetic"),
        ({"max_watermark": 0.5}, {"pwatermark": 0.8}, "max_watermark"),
        ({"max_unsafe": 0.1}, {"punsafe": 0.2}, "max_unsafe"),
        ({"min_similarity": 0.3}, {"similarity": 0.25}, "min_similarity"),
        ({"max_unsafe": 0.1, "min_aesthetic": 5}, {}, None),  # missing fields pass
        ({"max_unsafe": 0.1}, {"punsafe": None}, None),
        ({"max_unsafe": 0.1}, {"punsafe": float("nan")}, None),
        ({"max_unsafe": 0.1, "min_aesthetic": 5}, {"punsafe": 0.5, "aesthetic": 1}, "min_aesthetic"),  # argument order
    ],
)
def test_filters(thresholds, metadata, rejected_by):
    check = MetadataFilter(**thresholds)
    if rejected_by is None:
        check(metadata)
    else:
        with pytest.raises(FilteredOut) as rejected:
            check(metadata)
        assert rejected.value.name == rejected_by


def test_filters_off_by_default_and_with_no_metadata():
    assert not MetadataFilter() and not MetadataFilter(min_size=None)
    MetadataFilter(max_unsafe=0.1)(None)  # a sample without .json passes
    with pytest.raises(TypeError):
        MetadataFilter(max_unsafety=0.1)  # a typo is not silently ignored
