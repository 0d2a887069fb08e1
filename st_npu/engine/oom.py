"""Out-of-memory backoff: a batch the device cannot hold is split in two and each half retried, in order; one row
that still does not fit raises :class:`RowOutOfMemoryError`, naming the input, its tokens and a limit that fits."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class RowOutOfMemoryError(torch.OutOfMemoryError):
    """One input does not fit in device memory even alone (a ``torch.OutOfMemoryError``, as stock raises)."""

    def __init__(self, index: int | None, tokens: int, fits: int | None, device: torch.device) -> None:
        self.index, self.tokens, self.fits = index, tokens, fits
        which = f"input {index}" if index is not None else "an input"
        limit = (f"it would fit truncated to {fits} tokens: set model.max_seq_length = {fits} (or --max-seq-length)"
                 if fits else "not even a 1-token row fits: free device memory or use a smaller dtype")
        super().__init__(f"{device} out of memory on {which} ({tokens} tokens) alone; {limit}")


class Backoff:
    """Runs a forward, splitting the batch on a device out-of-memory error; warns once per model."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, forward: Callable[..., dict[str, Any]], features: dict[str, Any], device: torch.device,
                 kwargs: dict[str, Any], positions: Sequence[int] | None = None) -> dict[str, Any]:
        """``forward(features, **kwargs)``; ``positions``: the call's input index of each row, for the error."""
        try:
            return forward(features, **kwargs)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            rows = _rows(features)
            if rows < 2:
                _empty_cache(device)
                raise _row_error(forward, features, device, kwargs, positions) from exc
        if not self.warned:
            logger.warning("Device out of memory on a batch of %d; splitting batches in two and retrying.", rows)
            self.warned = True
        _empty_cache(device)
        keys = list(features)
        parts = (slice(0, rows // 2), slice(rows // 2, None))
        halves = [{key: _rows_slice(features[key], part, rows) for key in keys} for part in parts]
        return _merge([self(forward, half, device, kwargs, positions[part] if positions is not None else None)
                       for half, part in zip(halves, parts)], rows)


def _row_error(forward: Callable[..., dict[str, Any]], features: dict[str, Any], device: torch.device,
               kwargs: dict[str, Any], positions: Sequence[int] | None) -> RowOutOfMemoryError:
    """The error for a single row that does not fit, with the longest length that does: halved until a forward
    fits, then bisected (to 8 tokens) between that and the double that did not."""
    mask, ids = features.get("attention_mask"), features.get("input_ids")
    width = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.ndim == 2 else 0
    tokens = int(mask.sum()) if isinstance(mask, torch.Tensor) else width

    def fits(length: int) -> bool:
        cut = {key: value[:, :length] if isinstance(value, torch.Tensor) and value.ndim >= 2
               and value.shape[1] == width else value for key, value in features.items()}
        try:
            forward(cut, **kwargs)
            return True
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            _empty_cache(device)
            return False

    high, low = width, width // 2
    while low >= 1 and not fits(low):
        high, low = low, low // 2
    while low >= 1 and high - low > 8:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return RowOutOfMemoryError(positions[0] if positions else None, tokens, low or None, device)


def _rows(features: dict[str, Any]) -> int:
    ids = features.get("input_ids")
    return ids.shape[0] if isinstance(ids, torch.Tensor) else 0


def _rows_slice(value: Any, part: slice, rows: int) -> Any:
    return value[part] if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows else value


def _merge(outputs: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """One output dict from the halves': per-row tensors concatenated in order, the rest from the first."""
    merged = dict(outputs[0])
    for key, value in merged.items():
        if isinstance(value, torch.Tensor) and value.ndim and sum(out[key].shape[0] for out in outputs) == rows:
            merged[key] = torch.cat([out[key] for out in outputs])
    return merged


def _empty_cache(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()
