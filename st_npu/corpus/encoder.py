"""The model side of a corpus job: one ``st_npu.SentenceTransformer`` on one device, warmed up, embedding the
texts of one shard (or one Ray batch) at a time. Local workers and Ray actors both hold one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelSettings:
    """How the model is built and called: the same settings give the same vectors, and the manifest holds them."""

    model: str
    dtype: str | None = None
    spec: str | None = None
    prompt_name: str | None = None
    max_seq_length: int | None = None
    batch_size: int = 32

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ShardEncoder:
    """A model loaded on ``device`` (``None``: st_npu's auto choice, ``npu:0`` in a Ray actor) and warmed up."""

    def __init__(self, settings: ModelSettings, device: str | None) -> None:
        from st_npu import SentenceTransformer

        self.settings = settings
        self.model = SentenceTransformer(settings.model, device=device, dtype=settings.dtype, spec=settings.spec)
        if settings.max_seq_length:
            self.model.max_seq_length = settings.max_seq_length
        if self.model.device.type != "cpu":  # compile every static shape before the first shard, not during it
            self.model.warmup(settings.batch_size)

    @property
    def device(self) -> str:
        return str(self.model.device)

    def describe(self) -> dict[str, Any]:
        """What the model does to a text, as the manifest records it."""
        from st_npu import _compat

        prompt_name = self.settings.prompt_name or self.model.default_prompt_name
        return {
            "dimension": _compat.embedding_dimension(self.model),
            "max_seq_length": self.model.max_seq_length,
            "normalized": any(type(module).__name__ == "Normalize" for module in self.model),
            "prompt_name": prompt_name,
            "prompt": self.model.prompts.get(prompt_name, "") if prompt_name else "",
            "torch_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
        }

    def encode(self, texts: list[str]) -> np.ndarray:
        """An (n, dimension) float32 array, also for n = 0."""
        from st_npu import _compat

        vectors = self.model.encode(texts, batch_size=self.settings.batch_size, prompt_name=self.settings.prompt_name,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), _compat.embedding_dimension(self.model))
