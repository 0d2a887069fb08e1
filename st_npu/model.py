"""``st_npu.SentenceTransformer``: stock sentence-transformers with an NPU-aware constructor.

Construction is st_npu's: the device is chosen and checked first, the model folder is read and validated, and
the pipeline is handed to stock through its public ``modules=`` argument. Encoding stays stock's ``encode``;
st_npu only wraps it (input check, tokenizer prefetch), wraps ``forward`` (out-of-memory backoff) and adds
static shapes through hooks, so retrieval code written for sentence-transformers keeps working.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from st_npu import _compat

from st_npu.engine import attention, graphs
from st_npu.runtime.devices import check_dtype_supported, resolve_device, resolve_dtype
from st_npu.loading.folder import DEFAULT_MODEL, read_model_folder, resolve_model_path, spec_by_name
from st_npu.files.outputs import atomic_folder
from st_npu.engine.overlap import Prefetcher
from st_npu.loading.pipeline import build_modules, instruction_prompts
from st_npu.runtime.pools import start_pool
from st_npu.engine.checks import check_texts
from st_npu.engine.static_shapes import ShapePolicy, enable, padder_of
from st_npu.engine.tokenizer_lock import tokenizer_lock

logger = logging.getLogger(__name__)
# The prefetcher of the encode running in this thread, per model: concurrent encodes must not share one.
_active = threading.local()

# Stock constructor arguments that concern reading the model; st_npu applies them while it builds the modules.
LOADING_KWARGS = ("cache_folder", "revision", "token", "local_files_only", "trust_remote_code", "model_kwargs",
                  "processor_kwargs", "tokenizer_kwargs", "config_kwargs", "backend")


class SentenceTransformer(_compat.TokenLengthSorted):
    """A ``sentence_transformers.SentenceTransformer`` that runs on Ascend NPUs.

    Args:
        model_name_or_path: a model folder or a hub id (default ``BAAI/llm-embedder``), resolved through
            huggingface_hub's cache, ``HF_ENDPOINT`` mirrors and offline mode.
        device: ``None``/``"auto"`` (``npu:{LOCAL_RANK or 0}`` when an NPU is usable, else cuda, mps, xpu, cpu),
            ``"npu"``, ``"npu:N"``, ``"cpu"``, ``"cuda:N"`` or a ``torch.device``. torch_npu is loaded as needed.
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
        **stock_kwargs: any other argument of stock ``SentenceTransformer`` (prompts, model_kwargs, ...).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        spec: str | None = None,
        static_shapes: bool | ShapePolicy | None = None,
        overlap: bool | None = None,
        graphs: bool | None = None,
        **stock_kwargs: Any,
    ) -> None:
        unknown = set(stock_kwargs) - _compat.stock_init_parameters()
        if unknown:  # e.g. tokenizer_kwargs, which sentence-transformers 5.x and 6.x call processor_kwargs
            raise TypeError(f"SentenceTransformer() got unexpected keyword argument(s) {', '.join(sorted(unknown))}: "
                            f"the installed sentence-transformers {_compat.stock_version()} does not take them")
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        check_dtype_supported(torch_device, torch_dtype)
        self.model_spec = None
        self.overlap = torch_device.type != "cpu" if overlap is None else overlap
        self.last_overlap = {"hits": 0, "misses": 0}

        if stock_kwargs.get("modules") is not None:  # a pipeline the caller assembled: nothing to read
            if model_name_or_path not in (None, DEFAULT_MODEL):
                raise TypeError("Pass either model_name_or_path or modules, not both.")
            super().__init__(device=str(torch_device), **stock_kwargs)
        else:
            loading = {key: stock_kwargs.pop(key) for key in LOADING_KWARGS if key in stock_kwargs}
            folder = resolve_model_path(
                model_name_or_path or DEFAULT_MODEL,
                **{key: loading[key] for key in ("cache_folder", "revision", "token", "local_files_only") if key in loading},
            )
            plan = read_model_folder(folder, spec=spec_by_name(spec) if spec else None, model_id=str(model_name_or_path))
            modules = build_modules(plan, **loading)
            prompts = {**instruction_prompts(plan.spec), **plan.prompts, **(stock_kwargs.pop("prompts", None) or {})}
            stock_kwargs.setdefault("default_prompt_name", plan.default_prompt_name)
            stock_kwargs.setdefault("similarity_fn_name", plan.similarity_fn_name)
            super().__init__(modules=modules, device=str(torch_device), prompts=prompts, **stock_kwargs)
            self.model_spec = plan.spec
        if torch_dtype is not None:
            self.to(torch_dtype)
        if static_shapes is None:
            static_shapes = torch_device.type == "npu"
        if static_shapes:
            enable(self, static_shapes if isinstance(static_shapes, ShapePolicy) else None)
        else:  # one long text of a call still need not pad the short ones
            enable(self, padding=False)
        if torch_device.type == "npu":
            attention.enable(self)
        _enable_graphs(self, graphs, bool(static_shapes))

    def warmup(self, batch_size: int = 32, show_progress_bar: bool = True, max_tokens: int | None = None) -> int:
        """Compile every static shape an encode with ``batch_size`` can meet, now, and capture each one's graph
        where graph mode is on; returns how many shapes ran. ``max_tokens`` skips shapes of more padded tokens
        (rows x length) than that, for callers that never form such batches.

        On Ascend each shape compiles its operators once: BERT-base at batch 32 has 36 shapes, minutes in all
        the first time (seconds once CANN's operator cache holds them). A progress bar counts the shapes and a
        summary line gives the time.
        """
        return graphs.warmup(self, batch_size, max_tokens=max_tokens, show_progress_bar=show_progress_bar)

    def forward(self, input: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Stock forward; on a device out-of-memory error the batch is split in two and retried, in order."""
        keys = list(input)
        try:
            return super().forward(input, **kwargs)
        except RuntimeError as exc:
            rows = _rows(input)
            if not is_out_of_memory(exc) or rows < 2:
                raise
        if not getattr(self, "_warned_oom", False):
            logger.warning("Device out of memory on a batch of %d; splitting batches in two and retrying.", rows)
            self._warned_oom = True
        _empty_cache(self.device)
        halves = [{key: _rows_slice(input[key], part, rows) for key in keys}
                  for part in (slice(0, rows // 2), slice(rows // 2, None))]
        merged = _merge([self.forward(half, **kwargs) for half in halves], rows)
        padder = padder_of(self)  # the halves passed the trimming hook unrecognised: trim the whole here
        return padder.trim({key: input[key] for key in keys}, merged) if padder else merged

    def start_multi_process_pool(self, target_devices: list[str] | None = None) -> dict[str, Any]:
        """Stock's pool on every NPU by default, with NPU-ready workers and a clear error if one dies."""
        return start_pool(target_devices, super().start_multi_process_pool)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Stock ``encode``, after checking that every input is a string (stock fails deep in the tokenizer),
        with a known model's length limit for its instruction's side (llm-embedder: 256 tokens for a query)."""
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("sentences"))
        check_texts(inputs, singular=isinstance(inputs, str) or self.is_singular_input(inputs))
        limit = self.prompt_max_length(kwargs.get("prompt_name"))
        if limit is not None and limit < self.max_seq_length:
            kwargs = _compat.with_max_length(kwargs, limit)  # per call: self.max_seq_length is shared by threads
        prefetcher = self._prefetcher_for(inputs, args, kwargs)
        if prefetcher is None:
            return super().encode(*args, **kwargs)
        prefetchers = _active.__dict__.setdefault("by_model", {})
        prefetchers[id(self)] = prefetcher
        try:
            return super().encode(*args, **kwargs)
        finally:
            del prefetchers[id(self)]
            prefetcher.close()
            self.last_overlap = {"hits": prefetcher.hits, "misses": prefetcher.misses}

    def prompt_max_length(self, prompt_name: str | None) -> int | None:
        """The token limit a known model's spec sets for texts with this prompt: llm-embedder caps queries
        (``query``, ``{task}_query``) at 256 tokens and keys (``document``, ``{task}_key``) at 512, as
        FlagEmbedding does; None for other prompts and models."""
        if not self.model_spec or not prompt_name:
            return None
        for side, alias in (("query", "query"), ("key", "document")):
            if prompt_name == alias or prompt_name.endswith(f"_{side}"):
                return self.model_spec.get(f"{side}_max_length")
        return None

    def save(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Stock ``save``, written beside ``path`` and moved into place once complete: a failed save leaves
        ``path`` as it was, never half a model."""
        with atomic_folder(path) as staging:
            super().save(str(staging), *args, **kwargs)

    def _prefetcher_for(self, inputs: Any, args: tuple, kwargs: dict[str, Any]) -> Prefetcher | None:
        """A prefetcher when this encode is local and has more than one batch to overlap."""
        batch_size = kwargs.get("batch_size", 32)
        if not self.overlap or len(args) > 1 or isinstance(inputs, str) or kwargs.get("pool") is not None:
            return None
        if isinstance(kwargs.get("device"), list) or len(inputs) <= batch_size:
            return None
        batches = _compat.predicted_batches(self, list(inputs), batch_size)
        return None if batches is None else Prefetcher(self._stock_preprocess, batches)

    def preprocess(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Stock ``preprocess``, served from the running encode's prefetcher when it has one."""
        prefetcher = _active.__dict__.get("by_model", {}).get(id(self))
        if prefetcher is None or args:
            return self._stock_preprocess(inputs, *args, **kwargs)
        return prefetcher(inputs, **kwargs)

    def _stock_preprocess(self, *args: Any, **kwargs: Any) -> Any:
        with tokenizer_lock(self.tokenizer):
            return super().preprocess(*args, **kwargs)


def _enable_graphs(model: Any, wanted: bool | None, static_shapes: bool) -> None:
    if wanted is False:
        return
    reason = graphs.unavailable_reason(model.device) or (None if static_shapes else "graphs need static shapes")
    if reason is None:
        graphs.enable(model)
    elif wanted:
        raise ValueError(f"graphs=True: {reason}")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


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
