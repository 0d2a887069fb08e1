"""Out-of-memory backoff: a batch the device cannot hold is split in two and each half retried, in order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Backoff:
    """Runs a forward, splitting the batch on a device out-of-memory error; warns once per model."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, forward: Callable[..., dict[str, Any]], features: dict[str, Any], device: torch.device,
                 **kwargs: Any) -> dict[str, Any]:
        try:
            return forward(features, **kwargs)
        except RuntimeError as exc:
            rows = _rows(features)
            if not is_out_of_memory(exc) or rows < 2:
                raise
        if not self.warned:
            logger.warning("Device out of memory on a batch of %d; splitting batches in two and retrying.", rows)
            self.warned = True
        _empty_cache(device)
        keys = list(features)
        halves = [{key: _rows_slice(features[key], part, rows) for key in keys}
                  for part in (slice(0, rows // 2), slice(rows // 2, None))]
        return _merge([self(forward, half, device, **kwargs) for half in halves], rows)


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
