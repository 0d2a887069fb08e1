"""The input check of an encode call: what stock would fail on deep inside, refused up front with the index.

It refuses nothing stock accepts: pairs, 2-D string arrays, dicts and images go to stock untouched (an image on a
text model gets stock's own modality error). Only a batch item stock cannot read at all is reported here, as
the ValueError stock raises, with its position added.
"""

from __future__ import annotations

from typing import Any

from st_npu import _compat


class InvalidInputError(TypeError, ValueError):
    """An input stock cannot read: a ValueError as stock raises it, and a TypeError as it is one."""


def check_texts(inputs: Any, singular: bool) -> None:
    """Raise naming the first batch item stock cannot read and its position; ``singular`` is stock's reading of
    ``inputs`` (only lists, tuples and arrays are batches: a generator or a set is one input, which is no text)."""
    if singular:
        error = None if isinstance(inputs, str) else _compat.input_error(inputs)
        if error is not None:
            hint = "; pass list(...) of it" if hasattr(inputs, "__iter__") and not isinstance(inputs, dict) else ""
            raise InvalidInputError(f"encode() cannot read its input: {error}{hint}") from None
        return
    for position, item in enumerate(inputs):
        error = None if isinstance(item, str) else _compat.input_error(item)
        if error is not None:
            raise InvalidInputError(f"encode() input at index {position} ({item!r:.40}): {error}") from None
