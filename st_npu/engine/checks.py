"""The input check of an encode call: what stock would fail on deep inside, refused up front with the index."""

from __future__ import annotations

from typing import Any


class InvalidInputError(TypeError, ValueError):
    """An input that is not a string: a ValueError as stock raises it, and a TypeError as it is one."""


def check_texts(inputs: Any, singular: bool) -> None:
    """Raise naming the first non-string input and its position; ``singular`` is stock's reading of ``inputs``
    (only lists, tuples and arrays are batches: a generator or a set is one input, which is no text)."""
    if isinstance(inputs, str):
        return
    if singular:
        kind = "None" if inputs is None else type(inputs).__name__
        raise InvalidInputError(f"encode() needs a string or a list or tuple of strings, got {kind}"
                                f"{'; pass list(...) of it' if hasattr(inputs, '__iter__') else ''}.")
    for position, item in enumerate(inputs):
        if not isinstance(item, str):
            raise InvalidInputError(
                f"encode() input at index {position} is {type(item).__name__} ({item!r:.40}), expected str.")
