"""A call's inputs tokenised once, by the model's own (stock) ``preprocess``, then cut into batches by row.

Stock ``encode``/``predict`` tokenises each batch as it forms it; bucket grouping needs every input's token count
before that, and a server counts tokens at admission. Either way the inputs are tokenised here once: stock's
``preprocess`` over the whole call (in chunks), each row's per-token tensors kept at their true length. A batch's
features are then those rows stacked and padded as the tokenizer pads them, equal to what stock's ``preprocess``
returns for that batch (tests compare them key by key), so tokens are never computed twice.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch


CHUNK = 1024  # inputs per preprocess call: bounds the padded host tensors of one chunk


def key_of(item: Any) -> Hashable | None:
    """How a batch item is found among the call's rows: a text, or a pair (or tuple) of texts; None otherwise."""
    if isinstance(item, str):
        return item
    if isinstance(item, (tuple, list)) and item and all(isinstance(part, str) for part in item):
        return tuple(item)
    return None


class Tokens:
    """Per-row token tensors of a call's inputs, their token counts, and the call-wide values stock returned."""

    def __init__(self, rows: dict[str, list[torch.Tensor]], shared: dict[str, Any], lengths: list[int],
                 index: dict[Hashable, int], left: bool, pad_id: int, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs  # what preprocess was given besides the inputs (the prompt, the call's options)
        self.rows = rows
        self.shared = shared
        self.lengths = lengths
        self.index = index
        self.left = left
        self.pad_id = pad_id

    @classmethod
    def of(cls, inputs: Sequence[Any], preprocess: Callable[..., Mapping[str, Any]], lock: Any, left: bool,
           pad_id: int, kwargs: dict[str, Any]) -> Tokens | None:
        """Tokenise ``inputs`` with ``preprocess(chunk, **kwargs)`` (stock's, with the call's prompt and options),
        holding the tokenizer's ``lock``; None when the inputs or what preprocess returns cannot be cut by row
        (then stock tokenises per batch). ``left``: the tokenizer pads on the left."""
        keys = [key_of(item) for item in inputs]
        if not inputs or any(key is None for key in keys):
            return None
        rows: dict[str, list[torch.Tensor]] = {}
        shared: dict[str, Any] = {}
        lengths: list[int] = []
        for start in range(0, len(inputs), CHUNK):
            chunk = list(inputs[start : start + CHUNK])
            with lock:
                features = preprocess(chunk, **kwargs)
            if not _cut(features, len(chunk), left, rows, shared, lengths):
                return None
        index = {key: position for position, key in enumerate(keys)}
        return cls(rows, shared, lengths, index, left, pad_id, kwargs)

    @classmethod
    def from_ids(cls, items: Sequence[Any], ids: Sequence[Sequence[int]], sample: Mapping[str, Any],
                 kwargs: dict[str, Any], pad_id: int, sep_id: int | None, left: bool) -> Tokens | None:
        """Tokens for ``items`` from their token ids (special tokens included) computed by a caller, shaped like
        ``sample`` (stock's preprocess of ``items[0]`` with ``kwargs``): an attention mask of ones and, where the
        model takes them, token type ids (0 up to the first separator of a pair, then 1). None when ``items[0]``'s
        row does not come out exactly as ``sample``: then the call tokenises as usual."""
        keys = [key_of(item) for item in items]
        if not items or any(key is None for key in keys) or set(sample) - {"input_ids", "attention_mask",
                                                                           "token_type_ids"} - _shared_keys(sample):
            return None
        rows: dict[str, list[torch.Tensor]] = {"input_ids": [torch.tensor(list(row)) for row in ids]}
        if "attention_mask" in sample:
            rows["attention_mask"] = [torch.ones(len(row), dtype=torch.long) for row in ids]
        if "token_type_ids" in sample:
            rows["token_type_ids"] = [_segments(list(row), sep_id, isinstance(item, tuple))
                                      for row, item in zip(ids, items)]
        shared = {key: value for key, value in sample.items() if key not in rows}
        tokens = cls(rows, shared, [len(row) for row in ids], {key: i for i, key in enumerate(keys)}, left, pad_id,
                     kwargs)
        made = tokens.features(items[:1])
        if made.keys() != sample.keys() or not all(_same(made[key], sample[key]) for key in sample):
            return None
        return tokens

    @classmethod
    def join(cls, parts: Sequence[Tokens]) -> Tokens | None:
        """One set of tokens holding every row of ``parts`` (a server batch gathers several requests' tokens);
        None when the parts were tokenised differently (another prompt or option)."""
        first = parts[0]
        if any(part.kwargs != first.kwargs or not _same_values(part.shared, first.shared) for part in parts[1:]):
            return None
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in first.rows}
        lengths: list[int] = []
        index: dict[Hashable, int] = {}
        for part in parts:
            if part.rows.keys() != rows.keys():
                return None
            for key, position in part.index.items():
                index[key] = position + len(lengths)
            for key, per_row in part.rows.items():
                rows[key].extend(per_row)
            lengths.extend(part.lengths)
        return cls(rows, dict(first.shared), lengths, index, first.left, first.pad_id, first.kwargs)

    def positions(self, batch: Sequence[Any]) -> list[int] | None:
        found = [self.index.get(key_of(item)) for item in batch]
        return None if any(position is None for position in found) else found

    def features(self, batch: Sequence[Any]) -> dict[str, Any] | None:
        """The batch's features as stock's ``preprocess`` returns them (padded to its longest row); None when an
        item is not one of the call's inputs."""
        positions = self.positions(batch)
        if positions is None:
            return None
        width = max(self.lengths[position] for position in positions)
        features: dict[str, Any] = dict(self.shared)
        for key, per_row in self.rows.items():
            fill = self.pad_id if key == "input_ids" else 0
            features[key] = torch.stack([_pad_row(per_row[position], width, fill, self.left)
                                         for position in positions])
        return features


def _cut(features: Mapping[str, Any], count: int, left: bool, rows: dict[str, list[torch.Tensor]],
         shared: dict[str, Any], lengths: list[int]) -> bool:
    """Append one chunk's rows; False when a value is neither per-token, nor the same for every chunk."""
    mask = features.get("attention_mask")
    ids = features.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != count:
        return False
    width, first = ids.shape[1], not lengths
    counts = mask.sum(dim=1).tolist() if isinstance(mask, torch.Tensor) else [width] * count
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and value.ndim == 2 and tuple(value.shape) == (count, width):
            cut = [row[width - n:] if left else row[:n] for row, n in zip(value, counts)]
            rows.setdefault(key, []).extend(part.clone() for part in cut)
        elif key in shared:
            if not _same(shared[key], value):
                return False
        elif first:  # a call-wide value (a prompt length, ...)
            shared[key] = value
        else:
            return False
    lengths.extend(int(n) for n in counts)
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool((a == b).all())
    return a == b


def _shared_keys(sample: Mapping[str, Any]) -> set[str]:
    return {key for key, value in sample.items() if not isinstance(value, torch.Tensor)}


def _segments(ids: list[int], sep_id: int | None, pair: bool) -> torch.Tensor:
    """Token type ids: 0 for one text; for a pair, 0 through the first separator, 1 after it."""
    types = torch.zeros(len(ids), dtype=torch.long)
    if pair and sep_id in ids:
        types[ids.index(sep_id) + 1:] = 1
    return types


def _same_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)


def _pad_row(row: torch.Tensor, width: int, fill: int, left: bool) -> torch.Tensor:
    if row.shape[0] == width:
        return row
    padding = row.new_full((width - row.shape[0],), fill)
    return torch.cat([padding, row] if left else [row, padding])
