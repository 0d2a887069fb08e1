"""What kind of transformer a model is, learnt once from the model itself, never from its name.

Encoders (BERT, XLM-R: bge-m3, bge-reranker) and decoders (Qwen3: Qwen3-Embedding, Qwen3-Reranker; gte-Qwen2,
e5-mistral) differ in what the engine must keep when it pads batches to static shapes and hands SDPA its own mask:
- ``causal``: each token attends only to those before it. Read from the attention modules (transformers sets
  ``is_causal`` on each), else from the config (``is_decoder``, a ``*ForCausalLM`` architecture); a config that says
  ``is_causal: false`` (transformers 5's switch to bidirectional attention) wins.
- ``windowed``: some layers attend through a sliding window shorter than the texts (Mistral, Qwen2 with
  ``use_sliding_window``): one mask for every layer cannot say that, so the mask hook steps aside for such models.
- ``left`` and ``pad_id``: where padding goes and with which id, as the tokenizer pads (stock sets ``left`` for a
  causal LM it scores with ``LogitScore``, which reads the last position whatever the mask says).
- ``last_logits_only``: a causal LM whose features carry ``logits_to_keep`` (stock's text-generation Transformer):
  its LM head runs at the last position only, and every path (graphs included) must pass that on.
- ``caches``: a decoder whose config asks for a key/value cache (``use_cache``; sentence-transformers 6.x turns it
  off when it loads a model, 5.x leaves it on). Every forward then builds a cache nothing reads, from a host tensor
  (a host-to-device copy that graph capture refuses): the engine turns it off while it is installed.
Pooling finds the first or last real token from the attention mask (stock's Pooling), so where the output is read
needs nothing of the engine beyond keeping each row's real tokens where the tokenizer put them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    causal: bool
    windowed: bool
    left: bool
    pad_id: int
    last_logits_only: bool
    caches: bool


def learn(model: Any) -> Family:
    """The family of a sentence-transformers model whose first module is a Hugging Face transformer."""
    first = model[0]
    auto_model = getattr(first, "auto_model", None)
    config = getattr(auto_model, "config", None)
    tokenizer = model.tokenizer
    return Family(
        causal=_causal(auto_model, config),
        windowed=_windowed(config, model.max_seq_length),
        left=getattr(tokenizer, "padding_side", "right") == "left",
        pad_id=getattr(tokenizer, "pad_token_id", None) or 0,
        last_logits_only=getattr(first, "transformer_task", None) in ("text-generation", "any-to-any"),
        caches=getattr(config, "use_cache", False) is True,
    )


def _causal(auto_model: Any, config: Any) -> bool:
    if getattr(config, "is_causal", None) is False:
        return False
    flags = {module.is_causal for module in (auto_model.modules() if auto_model is not None else ())
             if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "is_causal", None), bool)}
    if flags:
        return True in flags
    architectures = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(name.endswith("ForCausalLM") for name in architectures)


def _windowed(config: Any, max_seq_length: int | None) -> bool:
    """Whether a sliding window narrows attention within the texts the model reads (a window at least as long as
    ``max_seq_length`` is plain causal attention)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return False
    return not max_seq_length or window < max_seq_length
