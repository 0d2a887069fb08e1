"""engine/family.py: what a transformer is, read from its modules and config (never its name)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from st_npu.engine import family


class SelfAttention(torch.nn.Module):
    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.is_causal = is_causal


def _model(*flags: bool) -> torch.nn.Module:
    return torch.nn.Sequential(*(SelfAttention(flag) for flag in flags))


def test_causal_comes_from_the_attention_modules_and_a_config_switch_wins():
    encoder_config = SimpleNamespace(architectures=["BertModel"])
    assert family._causal(_model(True, True), encoder_config)
    assert not family._causal(_model(False, False), SimpleNamespace(architectures=["QwenForCausalLM"]))
    assert not family._causal(_model(True), SimpleNamespace(is_causal=False))  # transformers 5's bidirectional switch
    # no attention module says: the config does
    assert family._causal(torch.nn.Linear(1, 1), SimpleNamespace(architectures=["LlamaForCausalLM"]))
    assert not family._causal(torch.nn.Linear(1, 1), encoder_config)


def test_a_sliding_window_counts_only_where_it_narrows_attention_within_the_texts():
    assert family._windowed(SimpleNamespace(sliding_window=4096), 32768)  # Mistral-style, every layer
    assert not family._windowed(SimpleNamespace(sliding_window=4096), 512)  # the window covers every text
    assert not family._windowed(SimpleNamespace(sliding_window=4096, use_sliding_window=False), 32768)  # Qwen3
    assert not family._windowed(SimpleNamespace(sliding_window=4096, layer_types=["full_attention"]), 32768)
    assert family._windowed(SimpleNamespace(sliding_window=4096, layer_types=["sliding_attention"]), 32768)
    assert not family._windowed(SimpleNamespace(sliding_window=None), 32768)


def test_a_decoders_key_value_cache_is_off_while_the_engine_is_installed_and_back_after_undo(tmp_path):
    """sentence-transformers 5.x loads decoders with ``use_cache`` on: each forward then builds a cache from a host
    tensor, which graph capture refuses. The engine turns it off (no output changes) and undo restores it."""
    import numpy as np
    import sentence_transformers

    from st_npu.engine import accelerate
    from st_npu.testing.fixtures import qwen3_embedder_folder

    model = sentence_transformers.SentenceTransformer(str(qwen3_embedder_folder(tmp_path / "q3")), device="cpu")
    config = model[0].auto_model.config
    config.use_cache = True  # as 5.x leaves it
    texts = ["a decoder", "embeds these texts"]
    before = model.encode(texts)
    engine = accelerate(model)
    assert engine.family.caches and config.use_cache is False
    assert np.abs(model.encode(texts) - before).max() <= 1e-6
    engine.undo()
    assert config.use_cache is True
