"""The one place that knows where sentence-transformers keeps things, across its 5.x and 6.x releases.

Everything else in st_npu uses sentence-transformers' public API; when a release moves or renames something,
this module is what changes. Differences are feature-detected (imports, signatures), never read from version
strings.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import sentence_transformers

try:  # 5.4+ keeps the module classes here; older releases only have sentence_transformers.models.
    from sentence_transformers.sentence_transformer import modules as stock_modules
except ImportError:  # pragma: no cover - exercised only on sentence-transformers < 5.4
    from sentence_transformers import models as stock_modules

Normalize, Pooling, Transformer = stock_modules.Normalize, stock_modules.Pooling, stock_modules.Transformer

StockSentenceTransformer = sentence_transformers.SentenceTransformer
StockCrossEncoder = sentence_transformers.CrossEncoder
StockSparseEncoder = getattr(sentence_transformers, "SparseEncoder", None)
StockMultiVectorEncoder = getattr(sentence_transformers, "MultiVectorEncoder", None)  # late interaction, 6.3+


@dataclass(frozen=True)
class Kind:
    """How stock runs one call of a model class, which is what the engine hooks into.

    The hook points, the same in 5.x and 6.x: ``entry`` (``encode``, ``predict``) sorts its inputs, and for each batch
    calls ``self.preprocess(batch, prompt=prompt, **kwargs)``, moves the features to the device and calls
    ``self.forward(features)`` (5.x) or ``self(features)`` (6.x, so that ``model.compile()`` applies): both reach an
    instance attribute named ``forward``. It then reads ``row_output`` of each row. ``grouped``: whether one call can
    run as several calls of the entry, one per sequence bucket (not a multi-vector encoder's: one matrix per input of
    its own length). ``stacked``: stock stacks the call's row tensors itself (a sparse encoder's COO rows), so groups
    are put together as tensors, not host arrays. ``owner``: the stock class whose ``entry`` this is.
    """

    entry: str
    row_output: str
    grouped: bool
    owner: type
    stacked: bool = False

    @property
    def stock_entry(self) -> Any:
        """Stock's own entry function, as this release defines it (read at import: a mock set on the stock class
        later does not change it)."""
        return _STOCK_ENTRIES[self.owner, self.entry]

    def replaced_on(self, model: Any) -> bool:
        """Whether the entry ``model``'s class has is not stock's (a mock, a wrapper, a subclass's override)."""
        return getattr(type(model), self.entry) is not self.stock_entry


_STOCK_ENTRIES = {(cls, entry): getattr(cls, entry)
                  for cls, entry in ((StockSentenceTransformer, "encode"), (StockCrossEncoder, "predict"),
                                     (StockSparseEncoder, "encode"), (StockMultiVectorEncoder, "encode"))
                  if cls is not None}


def model_kind(model: Any) -> Kind | None:
    """The kind of a sentence-transformers model, or None for a class the engine does not know."""
    if isinstance(model, StockCrossEncoder):
        return Kind("predict", "scores", grouped=True, owner=StockCrossEncoder)
    if StockSparseEncoder is not None and isinstance(model, StockSparseEncoder):
        return Kind("encode", "sentence_embedding", grouped=True, owner=StockSparseEncoder, stacked=True)
    if StockMultiVectorEncoder is not None and isinstance(model, StockMultiVectorEncoder):
        # One variable-length matrix per text: there is no row array to assemble groups into.
        return Kind("encode", "token_embeddings", grouped=False, owner=StockMultiVectorEncoder)
    if isinstance(model, StockSentenceTransformer):
        return Kind("encode", "sentence_embedding", grouped=True, owner=StockSentenceTransformer)
    return None


def model_classes() -> list[type]:
    """The stock model classes the engine accelerates (and ``patch()`` wraps), those this release has."""
    classes = (StockSentenceTransformer, StockCrossEncoder, StockSparseEncoder, StockMultiVectorEncoder)
    return [cls for cls in classes if cls is not None]


def name_or_path(model: Any) -> str | None:
    """Where the model's transformer was loaded from, as transformers records it (a hub id or a folder)."""
    transformer = hf_transformer(model)
    config = getattr(getattr(transformer, "auto_model", None), "config", None)
    return getattr(config, "_name_or_path", None) or None


def entry_signature(model: Any, kind: Kind) -> inspect.Signature:
    """The signature of the stock entry method (its first parameter after self is the inputs)."""
    return inspect.signature(kind.stock_entry)


def hf_transformer(model: Any) -> Any | None:
    """The Hugging Face transformer module the engine accelerates: the model's first module, when it is stock's
    ``Transformer`` with a tokenizer it calls (not a StaticEmbedding, WordEmbeddings or Router, which have no sequence
    dimension to bucket or run routes of their own)."""
    first = model[0] if len(model) else None
    if not isinstance(first, Transformer) or not callable(getattr(first, "tokenizer", None)):
        return None
    return first


def reads_prompt_length(model: Any) -> bool:
    """Whether a module reads the features' ``prompt_length`` (stock's Pooling with ``include_prompt=False``)."""
    return any(getattr(module, "include_prompt", True) is False for module in model)


def _accepts(function: Any, name: str) -> bool:
    return name in inspect.signature(function).parameters


def input_error(sample: Any) -> ValueError | None:
    """The ValueError stock's encode raises, deep inside, for one item of a batch it cannot read (its modality
    inference), or None where stock reads it; None too where this release infers no modalities."""
    try:
        from sentence_transformers.base.modality import infer_modality
    except ImportError:  # pragma: no cover - releases before multi-modal inputs
        return None
    try:
        infer_modality(sample)
    except ValueError as exc:
        return exc
    return None


def stock_version() -> str:
    return sentence_transformers.__version__


def new_transformer(folder: str, max_seq_length: int, do_lower_case: bool, model_kwargs: dict | None,
                    padding_side: str | None = None) -> Any:
    """A Transformer module built from arguments rather than a ``sentence_bert_config.json``; ``padding_side``: the
    side its tokenizer pads (a known decoder's, e.g. Qwen3-Embedding's left), else the tokenizer's own."""
    kwarg = "model_kwargs" if _accepts(Transformer.__init__, "model_kwargs") else "model_args"
    tokenizer_kwarg = "processor_kwargs" if _accepts(Transformer.__init__, "processor_kwargs") else "tokenizer_args"
    extra: dict[str, Any] = {tokenizer_kwarg: {"padding_side": padding_side}} if padding_side else {}
    try:  # 5.4+: a tokenizer with a chat template would add the message modality; an embedder reads plain text
        from sentence_transformers.base.modules.transformer import TRANSFORMER_TASK_DEFAULTS
    except ImportError:  # pragma: no cover - releases before modalities
        pass
    else:
        modality_config, output_name = TRANSFORMER_TASK_DEFAULTS["feature-extraction"]
        extra.update(modality_config={"text": dict(modality_config["text"])}, module_output_name=output_name)
    return Transformer(folder, max_seq_length=max_seq_length, do_lower_case=do_lower_case,
                       **{kwarg: model_kwargs or {}}, **extra)


def splade_modules(folder: str) -> list[Any]:
    """A SPLADE model's modules over a masked-LM folder: the MLM transformer and max SpladePooling (5.x had an
    ``MLMTransformer`` class and ``sparse_encoder.models``, which later releases deprecate for
    ``Transformer(transformer_task="fill-mask")`` and ``sparse_encoder.modules``)."""
    try:
        from sentence_transformers.sparse_encoder.modules import SpladePooling
    except ImportError:  # pragma: no cover - 5.x
        from sentence_transformers.sparse_encoder.models import SpladePooling
    if _accepts(Transformer.__init__, "transformer_task"):
        return [Transformer(folder, transformer_task="fill-mask"), SpladePooling("max")]
    from sentence_transformers.sparse_encoder.models import MLMTransformer  # pragma: no cover - 5.x

    return [MLMTransformer(folder), SpladePooling("max")]  # pragma: no cover - 5.x


def new_pooling(dimension: int, mode: str) -> Any:
    """A Pooling module with one mode; releases differ in argument names."""
    if _accepts(Pooling.__init__, "embedding_dimension"):
        return Pooling(embedding_dimension=dimension, pooling_mode=mode)
    return Pooling(word_embedding_dimension=dimension, pooling_mode=mode)  # pragma: no cover - < 5.4


def embedding_dimension(model: Any) -> int | None:
    """The model's output dimension, through whichever name this release gives the method (6.x renamed it)."""
    method = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return method()


def with_max_length(encode_kwargs: dict[str, Any], max_length: int) -> dict[str, Any]:
    """``encode`` keyword arguments that truncate this call's texts at ``max_length`` tokens, leaving the model's
    ``max_seq_length`` (shared by every thread) alone; the caller's own ``processing_kwargs`` win."""
    if not _accepts(Transformer.preprocess, "processing_kwargs"):
        raise TypeError(f"sentence-transformers {sentence_transformers.__version__} cannot limit one encode call's "
                        f"length (its Transformer.preprocess takes no processing_kwargs); upgrade it to 5.4 or newer")
    given = encode_kwargs.get("processing_kwargs") or {}
    text = {"max_length": max_length, **(given.get("text") or {})}
    return {**encode_kwargs, "processing_kwargs": {**given, "text": text}}


def quantize_embeddings(embeddings: Any, precision: str) -> Any:
    """Stock's quantization, from wherever this release exports it."""
    return sentence_transformers.quantize_embeddings(embeddings, precision=precision)


def stock_init_parameters() -> set[str]:
    """The keyword arguments stock ``SentenceTransformer.__init__`` takes in this release."""
    return set(inspect.signature(StockSentenceTransformer.__init__).parameters) - {"self"}


def predicted_batches(model: Any, inputs: list[Any], batch_size: int) -> list[list[Any]] | None:
    """The batches stock ``encode`` will form (it sorts by length first), or None where that is unknown."""
    import numpy as np

    try:
        order = np.argsort([-model._input_length(item) for item in inputs])
        if model._can_flatten_inputs():
            order = model._interleave_sorted_indices(order)
    except AttributeError:
        return None
    ordered = [inputs[index] for index in order]
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
