"""``st_npu.CrossEncoder``: stock sentence-transformers rerankers on Ascend NPUs.

A true subclass of ``sentence_transformers.CrossEncoder``: stock loads the model (every argument it takes, its own
files); st_npu chooses and checks the device first, casts to the dtype, and hands the model to the engine
(:func:`st_npu.engine.accelerate`), so ``predict`` and ``rank`` get what embedders get: pairs tokenised once and run
in sequence-bucket groups, static shapes, bool SDPA masks and captured graphs on npu, out-of-memory backoff.

A known reranker (``configs/models``, recognised by its hub id or folder name) whose spec gives a prompt template
gets it as its chat template, unless the model already has one that names the ``query`` role (a folder saved for
sentence-transformers, or the caller's ``processor_kwargs={"chat_template": ...}``): Qwen3-Reranker then scores as
its model card says, rather than through the ChatML template its tokenizer ships, which stock fills with the pair.
``st_npu.patch()`` leaves stock's formatting alone, as stock would score.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from st_npu import _compat
from st_npu.accelerated import AcceleratedModel
from st_npu.engine import Options, ShapePolicy, accelerate, check_budget
from st_npu.loading.folder import recognise_model
from st_npu.runtime.devices import check_dtype_supported, resolve_device, resolve_dtype


class CrossEncoder(AcceleratedModel, _compat.StockCrossEncoder):
    """A ``sentence_transformers.CrossEncoder`` that runs on Ascend NPUs.

    Args:
        model_name_or_path: as stock (a folder or a hub id); may be left out where ``modules=`` gives the pipeline.
        device: ``None``/``"auto"`` (``npu:{LOCAL_RANK or 0}`` when an NPU is usable, else cuda, mps, xpu, cpu),
            ``"npu"``, ``"npu:N"``, ``"cpu"``, ``"cuda:N"`` or a ``torch.device``. torch_npu is loaded as needed.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``, as names or torch dtypes.
        static_shapes, overlap, graphs, max_batch_tokens: as for :class:`st_npu.SentenceTransformer`.
        **stock_kwargs: any keyword argument of stock ``CrossEncoder`` in the installed release (modules, num_labels,
            max_length, activation_fn, its deprecated names, ...), passed as given; stock raises for the others.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
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
        # Keywords go to stock as given: it also takes the deprecated names its signature does not show
        # (model_name=, classifier_dropout=, tokenizer_args=, ...) and says what a missing path means.
        path = [] if model_name_or_path is None else [str(model_name_or_path)]
        super().__init__(*path, device=str(torch_device), **stock_kwargs)
        self.model_spec = recognise_model(self, path[0], reranker=True) if path else None
        template = (self.model_spec or {}).get("chat_template")
        tokenizer = getattr(self, "tokenizer", None)
        if template and tokenizer is not None and "query" not in (getattr(tokenizer, "chat_template", None) or ""):
            tokenizer.chat_template = template
        if torch_dtype is not None:
            self.to(torch_dtype)
        accelerate(self, Options(static_shapes, graphs, overlap, max_batch_tokens=max_batch_tokens))
