"""Static shapes: a few fixed (batch, sequence) shapes per corpus, so Ascend compiles a few operators once.

Ascend compiles an operator for every new input shape; stock sentence-transformers pads each batch to its own
longest text, so a corpus brings dozens of shapes and each one stalls (FlagEmbedding issue 1028). The engine pads
each tokenized batch, still on the CPU, up to a bucket length and a bucketed batch size (:func:`pad`), and cuts the
outputs back to the real rows and tokens (:func:`trim`), so a call returns exactly what it returns without padding.
Padding is numerically neutral: padded tokens are masked out of attention and pooling, padded rows are copies of a
real row and are dropped.

The default sequence buckets grow geometrically to any ``max_seq_length``: every power of two from 16 and the
midpoint 1.5x above it (16, 24, 32, 48, ..., 8192), so a text pays at most 1.5x its own length in tokens (2.25x in
attention) at two buckets per doubling. Powers of two alone (2x, 4x in attention) would halve the shapes but let a
600-token text of an 8,192-token model pay for 1,024; finer steps would add shapes, each compiled and captured once,
for little: the last partial batch of a group already costs up to 2x in rows. Every bucket is a multiple of 8.

A token budget (``max_tokens``: padded rows x bucket length, the server's ``--max-batch-tokens``) caps each batch:
long buckets run fewer rows (:meth:`ShapePolicy.rows_for`), short ones the full batch size, one text longer than the
budget runs alone. Warm-up compiles and captures only the shapes a call can form under it.
"""

from __future__ import annotations

import bisect
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from st_npu.engine.context import Batch

SHORTEST = 16
# Powers of two: a last partial batch of n rows costs at most 2n rows of compute.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# TEI's --max-batch-tokens default: 32 rows of 512 tokens, the batch BERT-base embedders are sized for. A device with
# room for more takes a larger budget (``max_batch_tokens=``); the largest bucket still runs, one row at a time.
DEFAULT_MAX_BATCH_TOKENS = 16384


def geometric_lengths(longest: int, shortest: int = SHORTEST) -> tuple[int, ...]:
    """``shortest``, 1.5x, 2x, 3x, 4x, ... it, below ``longest``, then ``longest`` itself."""
    lengths, power = [], shortest
    while power < longest:
        lengths += [length for length in (power, power * 3 // 2) if length < longest]
        power *= 2
    return (*lengths, longest)


DEFAULT_SEQ_LENGTHS = geometric_lengths(512)


@dataclass(frozen=True)
class ShapePolicy:
    """The bucket sizes; a batch is padded to the smallest bucket that holds it. ``seq_lengths=None`` (the default):
    geometric buckets up to the model's ``max_seq_length`` (:func:`geometric_lengths`); explicit ones are kept."""

    seq_lengths: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    geometric: bool = field(default=False, init=False)  # seq_lengths=None: they follow the model's limit

    def __post_init__(self) -> None:
        for name in ("seq_lengths", "batch_sizes"):
            values = getattr(self, name)
            if name == "seq_lengths" and values is None:
                object.__setattr__(self, name, DEFAULT_SEQ_LENGTHS)
                object.__setattr__(self, "geometric", True)
                continue
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"ShapePolicy.{name} must be positive integers, got {values!r}")
            object.__setattr__(self, name, tuple(sorted(set(values))))

    def for_model(self, max_seq_length: int | None) -> ShapePolicy:
        """Sequence buckets clipped to the model's limit, which is always a bucket itself."""
        if not max_seq_length:
            return self
        if self.geometric:
            return ShapePolicy(geometric_lengths(max_seq_length), self.batch_sizes)
        kept = tuple(length for length in self.seq_lengths if length < max_seq_length)
        return ShapePolicy(kept + (max_seq_length,), self.batch_sizes)

    def seq_bucket(self, length: int) -> int:
        return _bucket(self.seq_lengths, length)

    def batch_bucket(self, rows: int) -> int:
        return _bucket(self.batch_sizes, rows)

    def rows_for(self, length: int, batch_size: int, max_tokens: int | None) -> int:
        """Rows per batch for texts of ``length`` tokens: ``batch_size``, fewer where the padded batch (bucketed rows
        x bucket length) would pass ``max_tokens``; 1 where even one row does (it runs alone)."""
        seq = self.seq_bucket(length)
        if max_tokens is None or self.batch_bucket(batch_size) * seq <= max_tokens:
            return batch_size
        return max([rows for rows in self.batch_sizes if rows * seq <= max_tokens and rows <= batch_size] or [1])

    def shapes(self, batch_size: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
        """Every (rows, tokens) shape a call with this batch size can produce under the token budget."""
        shapes = []
        for rows in self.batch_sizes:
            for length in self.seq_lengths:
                if rows <= self.batch_bucket(self.rows_for(length, batch_size, max_tokens)):
                    shapes.append((rows, length))
        return shapes


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
