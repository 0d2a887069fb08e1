"""st_npu: sentence-transformers embedding models on Huawei Ascend NPUs.

``from st_npu import SentenceTransformer`` is a drop-in subclass of ``sentence_transformers.SentenceTransformer``
that builds the model from its folder's own files and runs it on ``npu:N``. Set ``ST_NPU_EMULATE=<n>`` to get
an emulated n-device ``npu`` backed by the CPU (for tests and CI; see ``st_npu.emulator``): torch loads it
through its backend autoload, as it loads torch_npu; importing this package installs nothing.

The public names are imported on first use: where torch_npu is installed but CANN is not sourced,
``import torch`` itself fails, and ``st-npu info`` must still be able to import this package to say so.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_PUBLIC = {
    "SentenceTransformer": "st_npu.model",
    "CrossEncoder": "st_npu.cross_encoder",
    "LLMEmbedder": "st_npu.llm_embedder",
    "ShapePolicy": "st_npu.engine.static_shapes",
    "patch": "st_npu.patching",
    "unpatch": "st_npu.patching",
    "embed_corpus": "st_npu.corpus",
}
__all__ = [*_PUBLIC, "__version__"]

def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'st_npu' has no attribute {name!r}")
    from st_npu.runtime.hints import explain_torch_npu_failure, is_torch_npu_failure

    try:
        module = importlib.import_module(_PUBLIC[name])
    except (RuntimeError, ImportError) as exc:
        # Without CANN, torch_npu fails inside `import torch` (autoload) or inside transformers' NPU probe.
        if is_torch_npu_failure(exc):
            raise RuntimeError(explain_torch_npu_failure(exc)) from exc
        raise
    return getattr(module, name)
