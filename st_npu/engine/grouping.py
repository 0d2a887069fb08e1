"""Bucket-grouped calls: the inputs of one call that fall into different sequence buckets run as separate groups.

Stock ``encode``/``predict`` sorts a call's inputs by length and cuts batches from that order, so one long text pads
every short text of its batch to the long one's bucket (the seed's 23 sentences: padding efficiency 0.13). Here the
call's inputs are tokenised once (:mod:`st_npu.engine.tokens`), split by the sequence bucket of their token counts,
each group goes through the stock entry on its own, and the rows are put back in input order; a single group is one
call, as before.

The groups ask stock for host rows (``convert_to_numpy``), and the options that would run device operators on the
real row count are done where they cost no new shape: ``normalize_embeddings`` (and ``truncate_dim``) on the padded
batch inside the forward (row-wise, so every row's value is the one stock computes), ``convert_to_tensor`` as one
host-to-device copy of the assembled rows instead of stock's ``torch.stack`` on the device (a new operator shape
for every row count). ``precision`` is applied to the whole call with stock's ``quantize_embeddings``, as stock does.
Output order, types, dtypes and devices are stock's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from st_npu import _compat
from st_npu.engine import finite
from st_npu.engine.static_shapes import ShapePolicy, Tails


def groups(lengths: list[int], policy: ShapePolicy) -> list[list[int]]:
    """Input positions grouped by the sequence bucket of their token count, shortest bucket first."""
    by_bucket: dict[int, list[int]] = {}
    for position, length in enumerate(lengths):
        by_bucket.setdefault(policy.seq_bucket(length), []).append(position)
    return [by_bucket[bucket] for bucket in sorted(by_bucket)]


def join_single_rows(positions: list[list[int]], sizes: list[int]) -> tuple[list[list[int]], list[int]]:
    """Groups whose batches hold one row each pad nothing whatever they are mixed with: they run as one stock call
    (a call of batch size 1, or the longest texts under the token budget), saving stock's per-call overhead."""
    joined_positions: list[list[int]] = []
    joined_sizes: list[int] = []
    for group, size in zip(positions, sizes):
        if size == 1 and joined_sizes and joined_sizes[-1] == 1:
            joined_positions[-1] = joined_positions[-1] + group
        else:
            joined_positions.append(group)
            joined_sizes.append(size)
    return joined_positions, joined_sizes


def groupable(model: Any, kind: _compat.Kind, options: dict[str, Any], items: Any) -> bool:
    """Whether a call (its bound ``options``, its inputs as a list ``items``) may run as bucket groups."""
    prompt_name = options.get("prompt_name")
    if not (kind.grouped and isinstance(items, list) and items and options.get("pool") is None
            and not isinstance(options.get("device"), list) and (prompt_name is None or prompt_name in model.prompts)):
        return False
    if kind.entry == "predict":
        return all(isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
                   for pair in items)
    return (options.get("output_value", kind.row_output) == kind.row_output
            and all(isinstance(text, str) for text in items))


def call_tails(model: Any, kind: _compat.Kind, options: dict[str, Any]) -> Tails:
    """The tails a grouped call applies in the forward; the call's own options then turn them off for stock."""
    if kind.entry != "encode" or kind.stacked:
        return Tails()
    truncate_dim = options["truncate_dim"] if options["truncate_dim"] is not None else model.truncate_dim
    return Tails(truncate_dim, bool(options["normalize_embeddings"]))


def run(model: Any, kind: _compat.Kind, bound: inspect.BoundArguments, items: list[Any], singular: bool,
        positions: list[list[int]], tails: Tails, batch_sizes: list[int],
        before_group: Callable[[list[Any], int], None] | None = None) -> Any:
    """Run the stock entry once per group of ``positions``, each with its ``batch_sizes`` entry (the token budget's
    rows for its bucket), and assemble stock's result for the whole call; ``before_group(group, batch_size)`` is told
    each group before stock runs it. Rows with NaN or inf raise :class:`~st_npu.errors.NonFiniteError`."""
    stock_entry = getattr(type(model), kind.entry)
    options = dict(bound.arguments)
    options.pop("self", None)
    extra = options.pop("kwargs", {})
    options.pop(next(iter(list(bound.signature.parameters)[1:2])))
    if kind.stacked:
        return _run_stacked(stock_entry, model, options, extra, items, singular, positions, before_group)
    precision = options.pop("precision", None)
    convert_to_tensor = options.pop("convert_to_tensor")
    convert_to_numpy = options.pop("convert_to_numpy") and not convert_to_tensor
    options.update(convert_to_numpy=True, convert_to_tensor=False)
    if kind.entry == "encode":
        options.update(precision=None, normalize_embeddings=False, truncate_dim=None)
    rows: np.ndarray | None = None
    for indices, batch_size in zip(positions, batch_sizes):
        group = [items[i] for i in indices]
        options["batch_size"] = batch_size
        if before_group is not None:
            before_group(group, batch_size)
        part = stock_entry(model, group, **options, **extra)
        finite.check_rows(part, indices, len(items), tails.dtype or model_dtype(model), kind.entry)
        if rows is None:
            rows = np.empty((len(items), *part.shape[1:]), dtype=part.dtype)
        rows[indices] = part
    if precision and precision != "float32":
        rows = _compat.quantize_embeddings(rows, precision)
    if convert_to_tensor or not convert_to_numpy:
        tensor = torch.from_numpy(rows)
        if not (precision and precision != "float32"):  # stock keeps float rows on the device, in their dtype
            device = torch.device(options["device"]) if options.get("device") is not None else model.device
            # Embeddings keep the model's dtype, as stock's stack of device rows does; scores stock upcasts.
            dtype = tails.dtype if kind.entry == "encode" and tails.dtype else tensor.dtype
            tensor = tensor.to(device=device, dtype=dtype)
        result: Any = tensor if convert_to_tensor else list(tensor)
    else:
        result = rows
    return result[0] if singular else result


def _run_stacked(stock_entry: Callable[..., Any], model: Any, options: dict[str, Any], extra: dict[str, Any],
                 items: list[Any], singular: bool, positions: list[list[int]],
                 before_group: Callable[[list[Any], int], None] | None) -> Any:
    """A call whose rows stock stacks itself (a sparse encoder): each group's rows as stock makes them, stacked in
    input order as stock stacks a call's rows, then given back as the call asked (a tensor or a list of rows)."""
    convert_to_tensor = options.pop("convert_to_tensor")
    rows: list[Any] = [None] * len(items)
    for indices in positions:
        group = [items[i] for i in indices]
        if before_group is not None:
            before_group(group, options["batch_size"])
        for position, row in zip(indices, stock_entry(model, group, convert_to_tensor=False, **options, **extra)):
            rows[position] = row
    stacked = torch.stack(rows)
    result = stacked if convert_to_tensor else list(stacked)
    return result[0] if singular else result


def model_dtype(model: Any) -> torch.dtype | None:
    return next((parameter.dtype for parameter in model.parameters()), None)
