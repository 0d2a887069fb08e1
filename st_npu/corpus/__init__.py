"""Embedding a whole corpus: streamed input, Parquet shards with a manifest, resumable, on every local NPU
(:mod:`st_npu.corpus.workers`) or on a Ray cluster (:mod:`st_npu.corpus.ray_engine`).

``embed_corpus(model, input, output, ...)`` is the API; ``st-npu embed-corpus`` the command;
``embed_dataset(dataset, ModelSettings(model), actors=n)`` the building block for pipelines already on Ray Data.
"""

from st_npu.corpus.encoder import ModelSettings
from st_npu.corpus.job import embed_corpus
from st_npu.corpus.ray_engine import embed_dataset

__all__ = ["ModelSettings", "embed_corpus", "embed_dataset"]
