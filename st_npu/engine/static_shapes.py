"""Static shapes: a few fixed (batch, sequence) shapes per corpus, so Ascend compiles a few operators once.

Ascend compiles an operator for every new input shape; stock sentence-transformers pads each batch to its own
longest text, so a corpus brings dozens of shapes and each one stalls (FlagEmbedding issue 1028). The engine pads
each tokenized batch, still on the CPU, up to a bucket length and a bucketed batch size (:func:`pad`), and cuts the
outputs back to the real rows and tokens (:func:`trim`), so a call returns exactly what it returns without padding.
Padding is numerically neutral: padded tokens are masked out of attention and pooling, padded rows are copies of a
real row and are dropped.
"""

from __future__ import annotations

import bisect
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from st_npu.engine.context import Batch

DEFAULT_SEQ_LENGTHS = (16, 32, 64, 128, 256, 512)
# Powers of two: a last partial batch of n rows costs at most 2n rows of compute.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ShapePolicy:
    """The bucket sizes; a batch is padded to the smallest bucket that holds it."""

    seq_lengths: tuple[int, ...] = DEFAULT_SEQ_LENGTHS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES

    def __post_init__(self) -> None:
        for name in ("seq_lengths", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"ShapePolicy.{name} must be positive integers, got {values!r}")
            object.__setattr__(self, name, tuple(sorted(set(values))))

    def for_model(self, max_seq_length: int | None) -> ShapePolicy:
        """Sequence buckets clipped to the model's limit, which is always a bucket itself."""
        if not max_seq_length:
            return self
        kept = tuple(length for length in self.seq_lengths if length < max_seq_length)
        return ShapePolicy(kept + (max_seq_length,), self.batch_sizes)

    def seq_bucket(self, length: int) -> int:
        return _bucket(self.seq_lengths, length)

    def batch_bucket(self, rows: int) -> int:
        return _bucket(self.batch_sizes, rows)

    def shapes(self, batch_size: int) -> list[tuple[int, int]]:
        """Every (rows, tokens) shape a call with this batch size can produce."""
        largest = self.batch_bucket(batch_size)
        return [(rows, length) for rows in self.batch_sizes if rows <= largest for length in self.seq_lengths]


def _bucket(buckets: tuple[int, ...], value: int) -> int:
    position = bisect.bisect_left(buckets, value)
    if position < len(buckets):
        return buckets[position]
    # Beyond the table (a batch larger than any bucket): the next power of two keeps shapes few.
    return 1 << (value - 1).bit_length()


class Tails:
    """encode's ``truncate_dim``/``normalize_embeddings``, applied in the forward on the padded batch (a shape that
    compiles once), not on the real rows afterwards (a new shape for every row count); records the rows' dtype."""

    def __init__(self, truncate_dim: int | None = None, normalize: bool = False) -> None:
        self.truncate_dim, self.normalize = truncate_dim, normalize
        self.dtype: torch.dtype | None = None

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        self.dtype = rows.dtype
        if self.truncate_dim is not None:
            rows = rows[..., : self.truncate_dim]
        return torch.nn.functional.normalize(rows, p=2, dim=1) if self.normalize else rows


def pad(features: MutableMapping[str, Any], target: tuple[int, int] | None, pad_id: int,
        left: bool) -> tuple[MutableMapping[str, Any], Batch | None]:
    """Pad a tokenized batch's per-token tensors to ``target`` (rows, tokens), or leave it at its own size when
    ``target`` is None; returns the features and what :func:`trim` needs (None when it is no token batch)."""
    ids = features.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return features, None
    rows, length = ids.shape
    target = target or (rows, length)
    padded = tuple(key for key, value in features.items()
                   if isinstance(value, torch.Tensor) and value.shape[:2] == (rows, length))
    for key in padded:
        features[key] = _pad(features[key], target, pad_id if key == "input_ids" else 0, left)
    return features, Batch(target, rows, length, left, padded)


def trim(output: Any, batch: Batch, tails: Tails | None, row_output: str) -> Any:
    """Cut a padded batch's outputs back to its real rows and tokens; apply the call's tails to ``row_output``."""
    if not isinstance(output, MutableMapping):
        return output
    padded_rows, padded_length = batch.target
    if tails is not None and isinstance(output.get(row_output), torch.Tensor):
        output[row_output] = tails.apply(output[row_output])
    tokens = slice(padded_length - batch.length, None) if batch.left else slice(0, batch.length)
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == padded_rows:
            value = value[: batch.rows]
            # Per-token tensors: the padded inputs and (rows, tokens, hidden) outputs such as token_embeddings.
            if (key in batch.padded or value.ndim >= 3) and value.shape[1] == padded_length:
                value = value[:, tokens]
            output[key] = value
    return output


def _pad(value: torch.Tensor, target: tuple[int, int], fill: int, left: bool) -> torch.Tensor:
    rows, length = value.shape[:2]
    if target[0] > rows:  # extra rows repeat the last real one: fully masked rows could produce NaN
        value = torch.cat([value, value[-1:].expand(target[0] - rows, *value.shape[1:])])
    if target[1] > length:
        padding = value.new_full((target[0], target[1] - length, *value.shape[2:]), fill)
        value = torch.cat([padding, value] if left else [value, padding], dim=1)
    return value
