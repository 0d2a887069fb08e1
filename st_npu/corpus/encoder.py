"""The model side of a corpus job: one ``st_npu.SentenceTransformer`` on one device, warmed up, embedding the
texts of one shard at a time. Local workers and Ray actors both hold one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from st_npu.errors import NonFiniteError

# Texts per encode call: a few batches, so the progress bar moves as batches finish while st_npu still groups
# texts of similar length within each call.
BATCHES_PER_CALL = 4
# Models built in this process: each Ray actor reports it, to show it loaded its model once for the whole job.
loads = 0


@dataclass(frozen=True)
class ModelSettings:
    """How the model is built and called: the same settings give the same vectors, and the manifest holds them."""

    model: str
    dtype: str | None = None
    spec: str | None = None
    prompt_name: str | None = None
    max_seq_length: int | None = None
    batch_size: int = 32
    truncate_dim: int | None = None
    max_batch_tokens: int | None = None  # the token budget per batch: it changes batches, not vectors

    def to_json(self) -> dict[str, Any]:
        settings = asdict(self)
        del settings["max_batch_tokens"]  # a resumed job may take another budget and still match its manifest
        return settings


def worker_threads(workers: int) -> int:
    """Torch threads for one of ``workers`` processes sharing this host: the cores it owns, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


class ShardEncoder:
    """A model loaded on ``device`` (``None``: st_npu's auto choice, ``npu:0`` in a Ray actor) and warmed up."""

    def __init__(self, settings: ModelSettings, device: str | None) -> None:
        global loads
        from transformers.utils import logging as transformers_logging

        from st_npu import SentenceTransformer

        self.settings = settings
        # transformers' "Loading weights" bar would stay on screen, stale, under the job's own bar.
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.model = SentenceTransformer(settings.model, device=device, dtype=settings.dtype, spec=settings.spec,
                                             max_batch_tokens=settings.max_batch_tokens)
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        loads += 1
        if settings.max_seq_length:
            self.model.max_seq_length = settings.max_seq_length
        if self.model.device.type != "cpu":  # compile every static shape before the first shard, not during it
            self.model.warmup(settings.batch_size)

    @property
    def device(self) -> str:
        return str(self.model.device)

    def describe(self) -> dict[str, Any]:
        """What the model does to a text, as the manifest records it."""
        prompt_name = self.settings.prompt_name or self.model.default_prompt_name
        return {
            "dimension": self.dimension,
            "max_seq_length": self.model.max_seq_length,
            "normalized": any(type(module).__name__ == "Normalize" for module in self.model),
            "prompt_name": prompt_name,
            "prompt": self.model.prompts.get(prompt_name, "") if prompt_name else "",
            "torch_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
        }

    @property
    def dimension(self) -> int:
        from st_npu import _compat

        full = _compat.embedding_dimension(self.model)
        return min(full, self.settings.truncate_dim) if self.settings.truncate_dim else full

    def encode(self, texts: list[str], on_rows: Callable[[int], None] | None = None) -> np.ndarray:
        """An (n, dimension) float32 array, also for n = 0; ``on_rows(k)`` after each call that embedded k texts."""
        step = self.settings.batch_size * BATCHES_PER_CALL
        parts = [np.zeros((0, self.dimension), np.float32)]
        for first in range(0, len(texts), step):
            chunk = texts[first:first + step]
            try:
                vectors = self.model.encode(chunk, batch_size=self.settings.batch_size,
                                            prompt_name=self.settings.prompt_name,
                                            truncate_dim=self.settings.truncate_dim, convert_to_numpy=True,
                                            show_progress_bar=False)
            except NonFiniteError as exc:  # positions within this call: name them within ``texts``
                raise NonFiniteError([first + index for index in exc.indices], len(texts), exc.dtype,
                                     exc.entry) from None
            parts.append(np.asarray(vectors, dtype=np.float32).reshape(len(chunk), self.dimension))
            if on_rows is not None:
                on_rows(len(chunk))
        return np.concatenate(parts)
