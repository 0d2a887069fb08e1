"""Non-finite outputs are an error: a NaN or infinite embedding or score (a float16 overflow, mostly) raises
:class:`~st_npu.errors.NonFiniteError` naming the inputs, the dtype and the fix, instead of coming back silently.

Only host rows are checked, those a call copies back anyway (a grouped call's numpy rows, a result already on the
CPU): checking device tensors would add a device sync to every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from st_npu.errors import NonFiniteError


def check_rows(rows: Any, positions: Sequence[int], count: int, dtype: Any, entry: str) -> None:
    """Raise for the rows of ``rows`` (host values of the inputs at ``positions`` of a call of ``count``) that are
    not finite; anything not on the host is left alone."""
    bad = _bad_rows(rows)
    if bad is not None and len(bad):
        raise NonFiniteError([positions[row] for row in bad], count, dtype, entry)


def check_result(result: Any, count: int, dtype: Any, entry: str) -> None:
    """:func:`check_rows` for a whole call's result: an array or CPU tensor of rows, or a list of per-input values
    (arrays, CPU tensors, dicts of them), each checked as the row of its input."""
    if not isinstance(result, list):
        check_rows(result, range(count), count, dtype, entry)
        return
    bad = []
    for position, value in enumerate(result):
        values = value.values() if isinstance(value, dict) else [value]
        if any(_bad_rows(part[None]) is not None and len(_bad_rows(part[None])) for part in values
               if isinstance(part, (np.ndarray, torch.Tensor))):
            bad.append(position)
    if bad:
        raise NonFiniteError(bad, count, dtype, entry)


def _bad_rows(rows: Any) -> np.ndarray | None:
    if isinstance(rows, torch.Tensor):
        if rows.device.type != "cpu" or not rows.is_floating_point() or rows.ndim == 0 or not rows.shape[0]:
            return None
        if rows.is_sparse:  # a sparse encoder's rows: only the stored values can be non-finite
            rows = rows.coalesce()
            bad = ~torch.isfinite(rows.values())
            return np.unique(rows.indices()[0][bad].numpy()) if bool(bad.any()) else np.empty(0, dtype=int)
        finite = torch.isfinite(rows).reshape(rows.shape[0], -1).all(dim=1)
        return torch.nonzero(~finite).flatten().numpy() if not bool(finite.all()) else np.empty(0, dtype=int)
    if isinstance(rows, np.ndarray) and rows.dtype.kind == "f" and rows.ndim and rows.shape[0]:
        finite = np.isfinite(rows).reshape(rows.shape[0], -1).all(axis=1)
        return np.flatnonzero(~finite)
    return None
