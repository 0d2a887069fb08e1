"""What st_npu's model classes add to stock's, the same for embedders and rerankers: warm-up, NPU-ready pools,
an atomic save. Everything about running the model is the engine's (:mod:`st_npu.engine`)."""

from __future__ import annotations

from typing import Any

from st_npu.engine import engine_of
from st_npu.files.outputs import atomic_folder
from st_npu.runtime.pools import start_pool


class AcceleratedModel:
    """Mixed in before the stock class (``class SentenceTransformer(AcceleratedModel, stock)``)."""

    def warmup(self, batch_size: int = 32, show_progress_bar: bool = True, max_tokens: int | None = None) -> int:
        """Compile every shape an encode with ``batch_size`` forms under the token budget (``max_batch_tokens``, or
        a smaller ``max_tokens``), now, and capture each one's graph where graph mode is on; returns how many shapes
        ran. On Ascend each shape compiles its operators once (minutes the first time, seconds once CANN's operator
        cache holds them); on the CPU, without static shapes, it runs the same bucket shapes, as encoding them
        would. A progress bar counts the shapes and a summary line gives shapes, graphs, the budget and the time.
        """
        engine = engine_of(self)
        if engine is None:
            raise RuntimeError("warmup() has nothing to compile: this model's first module is no Hugging Face "
                               "transformer, so it runs stock's path as it is.")
        return engine.warmup(batch_size, max_tokens=max_tokens, show_progress_bar=show_progress_bar)

    def start_multi_process_pool(self, target_devices: list[str] | None = None) -> dict[str, Any]:
        """Stock's pool on every NPU by default, with NPU-ready workers and a clear error if one dies."""
        return start_pool(target_devices, super().start_multi_process_pool)

    @property
    def last_overlap(self) -> dict[str, int]:
        """Batches of the last bucket-grouped call that were ready ahead (hits) or prepared on the spot (misses)."""
        engine = engine_of(self)
        return dict(engine.last_prefetch) if engine is not None else {"hits": 0, "misses": 0}

    def prompt_max_length(self, prompt_name: str | None) -> int | None:
        """The token limit a known model's spec sets for texts with this prompt (llm-embedder: 256 for queries)."""
        engine = engine_of(self)
        return engine.prompt_limit(prompt_name) if engine is not None else None

    def save(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Stock ``save``, written beside ``path`` and moved into place once complete: a failed save leaves
        ``path`` as it was, never half a model. ``save(None)`` does nothing, as stock."""
        if path is None:
            return super().save(path, *args, **kwargs)
        with atomic_folder(path) as staging:
            super().save(str(staging), *args, **kwargs)
