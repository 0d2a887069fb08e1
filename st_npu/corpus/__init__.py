"""Embedding a whole corpus: streamed input, Parquet shards with a manifest, resumable, on every local NPU
(:mod:`st_npu.corpus.workers`) or on a Ray cluster (:mod:`st_npu.corpus.ray_engine`).

``embed_corpus(model, input, output, ...)`` is the API; ``st-npu embed-corpus`` the command.
"""

from st_npu.corpus.job import embed_corpus

__all__ = ["embed_corpus"]
