"""Label leakage of descriptions: matching rule, the leakage fraction and the class-name mask."""

from __future__ import annotations

import pytest

from mugcp_bench.datasets.base import Datum
from mugcp_bench.describers.leakage import leakage_fraction, mask_classnames, mentions_class


@pytest.mark.parametrize(
    ("text", "classname", "expected"),
    [
        ("A Red Circle on grass.", "red circle", True),
        ("two red circles and a cat", "red circle", True),  # plural "s"
        ("a golden_retriever in a park", "golden retriever", True),  # underscores count as spaces
        ("a golden retriever", "golden_retriever", True),
        ("a photo of boxes", "box", True),  # plural "es"
        ("a photo of a bus", "buses", True),  # singular of a class name ending in "s"
        ("a reddish circle", "red circle", False),  # whole words only
        ("a red   circle", "red circle", True),  # whitespace collapsed
        ("scarlet circle", "red circle", False),
        ("a circle that is red", "red circle", False),
        ("", "red circle", False),
    ],
)
def test_mentions_class(text, classname, expected):
    assert mentions_class(text, classname) is expected


def _items(names):
    return [Datum(f"/d/{i}.png", i % 2, n, f"ds/{i}.png") for i, n in enumerate(names)]


def test_leakage_is_one_half_when_half_name_their_class():
    items = _items(["red circle", "blue_square", "green triangle", "yellow star"])
    texts = [
        "a photo of a small red circle on grass.",  # names its class
        "a photo of a blue square in the center.",  # names its class (underscore in the class name)
        "a photo of a red circle.",  # names ANOTHER class: not leakage of the true class
        "a bright object in the sky.",
    ]
    assert leakage_fraction(texts, items) == 0.5
    assert leakage_fraction({d.relpath: t for d, t in zip(items, texts)}, items) == 0.5
    classes = [d.classname for d in items]
    masked = [mask_classnames(t, classes) for t in texts]
    assert leakage_fraction(masked, items) == 0.0
    assert masked[0] == "a photo of a small object on grass."
    assert masked[1] == "a photo of a object in the center."
    assert not any(mentions_class(t, c) for t in masked for c in classes)


def test_mask_prefers_the_longest_name_and_keeps_other_text():
    assert mask_classnames("Two Red Circles and a red dot.", ["red", "red circle"]) == "Two object and a object dot."
    assert mask_classnames("nothing to see", ["red circle"]) == "nothing to see"
    assert mask_classnames("a cat", []) == "a cat"


def test_leakage_edge_cases():
    assert leakage_fraction([], []) is None
    with pytest.raises(ValueError):
        leakage_fraction(["a"], _items(["a", "b"]))
