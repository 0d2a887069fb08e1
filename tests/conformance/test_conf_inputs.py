"""Every input stock accepts goes to stock untouched; what stock cannot read fails as stock's ValueError, with the
index of the bad item (issue 17, cause 3)."""

from __future__ import annotations

import numpy as np
import pytest
import sentence_transformers
from PIL import Image

from conformance.doors import TEXTS

ACCEPTED = {
    "pairs as tuples": [("a question", "its answer"), ("x", "y")],
    "pairs as lists": [["a question", "its answer"], ["x", "y"]],
    "2-D array": np.array([["a question", "its answer"], ["x", "y"]]),
    "1-D array": np.array(TEXTS),
    "tuple": tuple(TEXTS),
    "dicts": [{"text": "hello"}, {"text": "x"}],
    "one dict": {"text": "hello"},
    "one string": "hello",
    "empty list": [],
}
REFUSED = {  # made per call: a generator serves one encode only
    "int": lambda: ["a", "b", 3],
    "None": lambda: [None, "a"],
    "bytes": lambda: ["a", b"x"],
    "triple": lambda: [("a", "b", "c")],
    "nested ints": lambda: [[1, 2], [3]],
    "scalar None": lambda: None,
    "generator": lambda: (text for text in TEXTS),
    "set": lambda: {"a", "b"},
    "image": lambda: Image.new("RGB", (8, 8)),
    "image in batch": lambda: ["a", Image.new("RGB", (8, 8))],
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_inputs_give_stock_output(conform, models, name):
    conform(lambda door: door.load(models["transformer"]).encode(ACCEPTED[name]))


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_inputs_raise_stock_error(conform, models, name):
    conform(lambda door: door.load(models["transformer"]).encode(REFUSED[name]()))


def test_bad_item_error_names_index_and_keeps_stock_message(models, door):
    batch = ["a", "b", 3.5, "d"]
    with pytest.raises(ValueError) as stock_error:
        sentence_transformers.SentenceTransformer(str(models["transformer"]), device="cpu").encode(batch)
    with door.active(), pytest.raises(ValueError) as ours:
        door.load(models["transformer"]).encode(batch)
    assert "index 2" in str(ours.value) and str(stock_error.value) in str(ours.value)


def test_image_on_text_model_gets_stock_modality_error(models, door):
    with door.active(), pytest.raises(ValueError, match="Modality 'image' is not supported"):
        door.load(models["transformer"]).encode(Image.new("RGB", (8, 8)))
