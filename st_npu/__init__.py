"""st_npu: sentence-transformers embedding models on Huawei Ascend NPUs.

``from st_npu import SentenceTransformer`` is a drop-in subclass of ``sentence_transformers.SentenceTransformer``
that builds the model from its folder's own files and runs it on ``npu:N``. Set ``ST_NPU_EMULATE=<n>`` to get
an emulated n-device ``npu`` backed by the CPU (for tests and CI; see ``st_npu.testing.emulator``).
"""

from __future__ import annotations

from st_npu.doctor import explain_torch_npu_failure

try:
    import torch  # noqa: F401
except RuntimeError as exc:  # torch auto-loads torch_npu; without CANN that fails inside `import torch`
    raise RuntimeError(explain_torch_npu_failure(exc)) from exc

from st_npu.testing.emulator import install_from_env

install_from_env()

from st_npu.llm_embedder import LLMEmbedder  # noqa: E402
from st_npu.model import SentenceTransformer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SentenceTransformer", "LLMEmbedder", "__version__"]
