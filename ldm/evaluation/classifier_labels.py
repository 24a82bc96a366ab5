"""Which classes classifier guidance steers each image to: from its prompt, or given as ``labels=``.

The class names come from the classifier checkpoint's spec ({attribute: [class names]}, e.g. the
toy's colour, shape and position). ``labels`` is one of

    null                        each prompt's own: a JSONL record's "labels" field, else the class
                                names the prompt contains as whole words ("a red circle in the top
                                left" -> colour red, shape circle, position top left)
    {colour: red, shape: circle}   the same for every image; attributes left out are free
    [{colour: red}, {colour: blue}] one mapping per prompt, in order

An attribute no label names is left free (the classifier's other heads do not pull on it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.errors import UserError
from ldm.pipeline import ClassifierGuide

Classes = Mapping[str, Sequence[str]]  # attribute -> class names, as a classifier spec stores them


def checked_labels(labels: Any, classes: Classes, where: str) -> dict[str, str]:
    """A {attribute: class name} mapping checked against the classifier's classes, or a one-line error."""
    if not isinstance(labels, Mapping):
        raise UserError(f"{where}: labels must be a mapping such as {{{_example(classes)}}}, got {labels!r}")
    checked = {}
    for attribute, name in labels.items():
        if attribute not in classes:
            raise UserError(f"{where}: the classifier has no attribute {attribute!r} (it has {', '.join(classes)})")
        if name is None:
            continue  # an explicit null: free
        if str(name) not in classes[attribute]:
            raise UserError(
                f"{where}: {attribute} {name!r} is not one of the classifier's {', '.join(classes[attribute])}"
            )
        checked[str(attribute)] = str(name)
    return checked


def _example(classes: Classes) -> str:
    return ", ".join(f"{attribute}: {names[0]}" for attribute, names in list(classes.items())[:2])


def named_in_prompt(prompt: str, classes: Classes) -> dict[str, str]:
    """The class of each attribute whose name the prompt contains as whole words (case-insensitive).

    A name inside a longer matched name of the same attribute does not count ("left" in "top left");
    two different classes of one attribute are a one-line error: the prompt is ambiguous."""
    found = {}
    for attribute, names in classes.items():
        spans = []
        for name in names:
            for match in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", prompt, flags=re.IGNORECASE):
                spans.append((match.start(), match.end(), name))
        outer = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o != s for o in spans)]
        distinct = sorted({name for _, _, name in outer})
        if len(distinct) > 1:
            raise UserError(
                f"prompt {prompt[:80]!r} names several {attribute} classes ({', '.join(distinct)}): "
                "give labels=... for classifier guidance"
            )
        if distinct:
            found[attribute] = distinct[0]
    return found


def record_labels(records: Sequence[Mapping[str, Any]], labels: Any, classes: Classes) -> list[dict[str, str]]:
    """The wanted classes of each prompt record (module docstring); each record must want at least one."""
    if labels is None:
        out = [
            checked_labels(r["labels"], classes, f"prompt {i} ('labels' field)")
            if "labels" in r
            else named_in_prompt(r["prompt"], classes)
            for i, r in enumerate(records)
        ]
    elif isinstance(labels, Mapping):
        out = [checked_labels(labels, classes, "labels")] * len(records)
    elif isinstance(labels, Sequence) and not isinstance(labels, str):
        if len(labels) != len(records):
            raise UserError(
                f"labels: {len(labels)} mappings for {len(records)} prompts (give one per prompt, or one mapping for all)"
            )
        out = [checked_labels(value, classes, f"labels[{i}]") for i, value in enumerate(labels)]
    else:
        raise UserError(
            f"labels must be null, a mapping such as {{{_example(classes)}}} or a list of them, got {labels!r}"
        )
    for index, wanted in enumerate(out):
        if not wanted:
            prompt = records[index]["prompt"]
            raise UserError(
                f"classifier guidance: prompt {index} ({prompt[:60]!r}) names none of the classifier's "
                f"classes: give labels=..., e.g. labels={{{_example(classes)}}}"
            )
    return out


def label_indices(batch: Sequence[Mapping[str, str]], classes: Classes) -> dict[str, Tensor]:
    """{attribute: (B,) long class indices}, -1 where an image leaves the attribute free
    (``ClassLogLikelihood``'s input)."""
    return {
        attribute: torch.tensor(
            [list(names).index(wanted[attribute]) if attribute in wanted else -1 for wanted in batch]
        )
        for attribute, names in classes.items()
    }


class ClassifierJob:
    """Classifier guidance over a job: the classifier and its checkpoint's spec (``classes``: attribute ->
    class names; the VAE and schedule it was trained with), the scale, and each prompt record's labels
    (``labels``: as ``record_labels`` takes them)."""

    def __init__(
        self,
        classifier: torch.nn.Module,
        spec: Mapping[str, Any],
        scale: float,
        records: Sequence[Mapping[str, Any]],
        labels: Any = None,
    ):
        self.classifier = classifier
        self.spec = spec
        self.classes = {name: list(names) for name, names in spec["classes"].items()}
        self.scale = float(scale)
        self.labels = record_labels(records, labels, self.classes)

    def fields(self, record: int) -> dict[str, Any]:
        """The classes the images of prompt record ``record`` were guided to (their metadata's "labels")."""
        return {"labels": self.labels[record]}

    def guide(self, records: Sequence[int]) -> ClassifierGuide:
        """``ClassifierGuide`` for a batch of items of these prompt records."""
        return ClassifierGuide(
            self.classifier, label_indices([self.labels[r] for r in records], self.classes), self.scale
        )
