"""The classes classifier guidance steers to: named in prompts, given as labels=, checked against the classifier."""

import pytest
import torch

from ldm.errors import UserError
from ldm.evaluation.classifier_labels import label_indices, named_in_prompt, record_labels
from ldm.training.classifier import TOY_CLASSES


def test_the_toy_prompts_name_all_three_attributes():
    assert named_in_prompt("a red circle in the top left", TOY_CLASSES) == {
        "colour": "red",
        "shape": "circle",
        "position": "top left",
    }
    assert named_in_prompt("A Blue Square, centre stage in the CENTER", TOY_CLASSES) == {
        "colour": "blue",
        "shape": "square",
        "position": "center",
    }
    assert named_in_prompt("", TOY_CLASSES) == {}
    assert named_in_prompt("reddish circles", TOY_CLASSES) == {}  # whole words only


def test_a_name_inside_a_longer_one_does_not_count_and_two_classes_are_ambiguous():
    classes = {"position": ["left", "top left", "right"]}
    assert named_in_prompt("in the top left", classes) == {"position": "top left"}
    assert named_in_prompt("on the left", classes) == {"position": "left"}
    with pytest.raises(UserError, match=r"names several colour classes \(blue, red\): give labels="):
        named_in_prompt("a red or blue circle", TOY_CLASSES)


def test_labels_for_every_image_one_per_prompt_or_from_each_record():
    records = [{"prompt": ""}, {"prompt": "", "labels": {"shape": "triangle"}}]
    assert record_labels(records, {"colour": "red"}, TOY_CLASSES) == [{"colour": "red"}] * 2
    assert record_labels(records, [{"colour": "red"}, {"colour": "blue", "shape": None}], TOY_CLASSES) == [
        {"colour": "red"},
        {"colour": "blue"},
    ]
    with pytest.raises(
        UserError,
        match=r"prompt 0 \(''\) names none of the classifier's classes: give labels=..., e.g. labels=\{colour: red, shape: circle\}",
    ):
        record_labels(records, None, TOY_CLASSES)
    assert record_labels(records[1:] + [{"prompt": "a green square in the center"}], None, TOY_CLASSES) == [
        {"shape": "triangle"},
        {"colour": "green", "shape": "square", "position": "center"},
    ]
    with pytest.raises(UserError, match=r"labels: 1 mappings for 2 prompts"):
        record_labels(records, [{"colour": "red"}], TOY_CLASSES)
    with pytest.raises(
        UserError, match=r"labels: the classifier has no attribute 'size' \(it has colour, shape, position\)"
    ):
        record_labels(records, {"size": "big"}, TOY_CLASSES)
    with pytest.raises(UserError, match=r"labels\[1\]: colour 'pink' is not one of the classifier's red, green"):
        record_labels(records, [{"colour": "red"}, {"colour": "pink"}], TOY_CLASSES)
    with pytest.raises(UserError, match="labels must be null, a mapping"):
        record_labels(records, "red", TOY_CLASSES)


def test_indices_leave_unnamed_attributes_free():
    indices = label_indices([{"colour": "green", "position": "center"}, {"shape": "triangle"}], TOY_CLASSES)
    assert {k: v.tolist() for k, v in indices.items()} == {"colour": [1, -1], "shape": [-1, 2], "position": [4, -1]}
    assert all(v.dtype == torch.long for v in indices.values())
