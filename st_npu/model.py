"""``st_npu.SentenceTransformer``: stock sentence-transformers with an NPU-aware constructor.

Construction wraps stock's: the device is chosen and checked first, the model folder is read and validated with
errors that name the file (:mod:`st_npu.loading.folder`), then stock's own loader builds the modules
(:mod:`st_npu.loading.pipeline`; only a known model without ``modules.json`` is assembled by st_npu). Everything
about running the model is the engine's (:func:`st_npu.engine.accelerate`, the same for every door), so this class
keeps only construction and stock API conveniences (``warmup``, an atomic ``save``, NPU-ready pools).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from st_npu import _compat
from st_npu.accelerated import AcceleratedModel
from st_npu.engine import Options, ShapePolicy, accelerate, check_budget
from st_npu.loading.folder import DEFAULT_MODEL, read_model_folder, resolve_model_path, spec_by_name
from st_npu.loading.pipeline import stock_arguments
from st_npu.runtime.devices import check_dtype_supported, resolve_device, resolve_dtype

# Stock constructor arguments that say where to find a hub model; st_npu fetches it before stock loads it.
HUB_KWARGS = ("cache_folder", "revision", "token", "local_files_only")


class SentenceTransformer(AcceleratedModel, _compat.StockSentenceTransformer):
    """A ``sentence_transformers.SentenceTransformer`` that runs on Ascend NPUs.

    Args:
        model_name_or_path: a model folder or a hub id (``BAAI/llm-embedder`` when neither it nor ``modules`` is
            given), resolved through huggingface_hub's cache, ``HF_ENDPOINT`` mirrors and offline mode.
        device: ``None``/``"auto"`` (``npu:{LOCAL_RANK or 0}`` when an NPU is usable, else cuda, mps, xpu, cpu),
            ``"npu"``, ``"npu:N"``, ``"cpu"``, ``"cuda:N"`` or a ``torch.device``. torch_npu is loaded as needed.
            With ``model_kwargs={"device_map": ...}`` it is left to stock, which ignores it with a warning.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``, as names or torch dtypes.
        spec: the name of a known-model spec (``configs/models``) for a folder whose name does not say which
            model it holds; needed only when the folder lacks ``modules.json``.
        static_shapes: pad batches to a few bucket shapes (see :mod:`st_npu.engine.static_shapes`); ``None`` turns
            them on for NPUs only, ``True``/``False`` force it, a ``ShapePolicy`` sets the buckets. Either way
            one encode call runs its texts in sequence-bucket groups (:mod:`st_npu.engine.grouping`).
        overlap: tokenize the next batches on a CPU thread while the device computes (:mod:`st_npu.engine.overlap`);
            ``None`` turns it on for accelerators, off on the CPU, where the thread would compete for cores.
        graphs: capture each static shape's forward as a device graph in ``warmup()`` and replay it
            (:mod:`st_npu.engine.graphs`); ``None`` turns it on where static shapes are on and the device can capture
            (NPU with ``torch.npu.NPUGraph``, not 910A; CUDA), ``True`` insists (an error says why it cannot).
        max_batch_tokens: the token budget of one batch, padded rows x padded length (``None``: 16,384, TEI's
            default): long texts run fewer rows per batch, short ones the full ``batch_size``, a text longer than
            the budget alone; warm-up compiles only the shapes under it. Settable later as
            ``st_npu.engine.engine_of(model).max_batch_tokens``.
        **stock_kwargs: any other argument of stock ``SentenceTransformer`` (prompts, model_kwargs, ...).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        spec: str | None = None,
        static_shapes: bool | ShapePolicy | None = None,
        overlap: bool | None = None,
        graphs: bool | None = None,
        max_batch_tokens: int | None = None,
        **stock_kwargs: Any,
    ) -> None:
        unknown = set(stock_kwargs) - _compat.stock_init_parameters()
        if unknown:  # e.g. tokenizer_kwargs, which sentence-transformers 5.x and 6.x call processor_kwargs
            raise TypeError(f"SentenceTransformer() got unexpected keyword argument(s) {', '.join(sorted(unknown))}: "
                            f"the installed sentence-transformers {_compat.stock_version()} does not take them")
        check_budget(max_batch_tokens)
        torch_dtype = resolve_dtype(dtype)
        if (stock_kwargs.get("model_kwargs") or {}).get("device_map") is not None:
            stock_device = device  # stock places the modules and ignores device, with a warning
        else:
            stock_device = str(resolve_device(device))
            check_dtype_supported(torch.device(stock_device), torch_dtype)
        self.model_spec = None
        if stock_kwargs.get("modules") is not None and model_name_or_path is None:  # a pipeline the caller built
            super().__init__(device=stock_device, **stock_kwargs)
        else:
            folder = resolve_model_path(model_name_or_path or DEFAULT_MODEL,
                                        **{key: stock_kwargs[key] for key in HUB_KWARGS if key in stock_kwargs})
            plan = read_model_folder(folder, spec=spec_by_name(spec) if spec else None,
                                     model_id=str(model_name_or_path or DEFAULT_MODEL))
            path, kwargs = stock_arguments(plan, stock_kwargs)
            super().__init__(path, device=stock_device, **kwargs)
            self.model_spec = plan.spec
        if torch_dtype is not None:
            self.to(torch_dtype)
        accelerate(self, Options(static_shapes, graphs, overlap, self.model_spec, max_batch_tokens))
