"""``LLMEmbedder``: the seed port's interface (and FlagEmbedding's) for BAAI/llm-embedder, kept for its users.

A thin layer over :class:`st_npu.SentenceTransformer`: numpy out, a 1-D vector for a single string, and the
task instructions of llm-embedder prepended to queries and keys, with FlagEmbedding's length limits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from st_npu.loading.folder import DEFAULT_MODEL
from st_npu.model import SentenceTransformer


class LLMEmbedder:
    """``LLMEmbedder(model_path, device="npu").encode(["Hello world", ...])`` -> ``np.ndarray`` of shape (n, 768).

    ``encode_queries(texts, task="qa")`` and ``encode_keys(texts, task="qa")`` prepend the instruction of one of
    llm-embedder's six tasks (qa, convsearch, chat, lrlm, icl, tool). Safe to share between threads: the length
    limits are per call, nothing of the model is changed.
    """

    def __init__(
        self,
        model_path: str = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("spec", DEFAULT_MODEL)
        self.model = SentenceTransformer(model_path, device=device, dtype=dtype, **kwargs)
        self.spec = self.model.model_spec

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.spec["instructions"])

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, texts: str | list[str], batch_size: int = 32, **kwargs: Any) -> np.ndarray:
        """Embeddings without instruction: (n, dim) for a list, (dim,) for one string."""
        return self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, **kwargs)

    def encode_queries(self, texts: str | list[str], task: str = "qa", batch_size: int = 32, **kwargs: Any) -> np.ndarray:
        """The task's query instruction prepended; 256 tokens at most (the model applies the limit per call)."""
        return self.encode(texts, batch_size=batch_size, prompt_name=self._prompt(task, "query"), **kwargs)

    def encode_keys(self, texts: str | list[str], task: str = "qa", batch_size: int = 32, **kwargs: Any) -> np.ndarray:
        """The task's key instruction prepended; 512 tokens at most."""
        return self.encode(texts, batch_size=batch_size, prompt_name=self._prompt(task, "key"), **kwargs)

    def _prompt(self, task: str, side: str) -> str:
        if task not in self.spec["instructions"]:
            raise ValueError(f"Unknown task {task!r}; llm-embedder's tasks are: {', '.join(self.tasks)}.")
        return f"{task}_{side}"
