"""``st_npu.CrossEncoder``: stock sentence-transformers rerankers on Ascend NPUs.

A true subclass of ``sentence_transformers.CrossEncoder``: stock loads the model (every argument it takes, its own
files); st_npu chooses and checks the device first, casts to the dtype, and hands the model to the engine
(:func:`st_npu.engine.accelerate`), so ``predict`` and ``rank`` get what embedders get: pairs tokenised once and run
in sequence-bucket groups, static shapes, bool SDPA masks and captured graphs on npu, out-of-memory backoff.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from st_npu import _compat
from st_npu.accelerated import AcceleratedModel
from st_npu.engine import Options, ShapePolicy, accelerate, check_budget
from st_npu.runtime.devices import check_dtype_supported, resolve_device, resolve_dtype


class CrossEncoder(AcceleratedModel, _compat.StockCrossEncoder):
    """A ``sentence_transformers.CrossEncoder`` that runs on Ascend NPUs.

    Args:
        model_name_or_path: as stock (a folder or a hub id).
        device: ``None``/``"auto"`` (``npu:{LOCAL_RANK or 0}`` when an NPU is usable, else cuda, mps, xpu, cpu),
            ``"npu"``, ``"npu:N"``, ``"cpu"``, ``"cuda:N"`` or a ``torch.device``. torch_npu is loaded as needed.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``, as names or torch dtypes.
        static_shapes, overlap, graphs, max_batch_tokens: as for :class:`st_npu.SentenceTransformer`.
        **stock_kwargs: any other argument of stock ``CrossEncoder`` (num_labels, max_length, activation_fn, ...).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        static_shapes: bool | ShapePolicy | None = None,
        overlap: bool | None = None,
        graphs: bool | None = None,
        max_batch_tokens: int | None = None,
        **stock_kwargs: Any,
    ) -> None:
        check_budget(max_batch_tokens)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        check_dtype_supported(torch_device, torch_dtype)
        super().__init__(str(model_name_or_path), device=str(torch_device), **stock_kwargs)
        if torch_dtype is not None:
            self.to(torch_dtype)
        accelerate(self, Options(static_shapes, graphs, overlap, max_batch_tokens=max_batch_tokens))
