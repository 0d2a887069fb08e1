"""The model families Ascend RAG stacks deploy, each against stock through every door (issue 22): a Qwen3 decoder
embedder (left padding, last-token pooling, an instruction prompt, Matryoshka truncation), a Qwen3 causal-LM
reranker (stock's ``Transformer(text-generation)`` + ``LogitScore``; tokenizer configs that say left and right) and
an XLM-R embedder of bge-m3's shape. On the emulated npu, after warm-up, nothing compiles and each batch is one
graph replay between its two copies; decoders keep causal attention with a bool mask (fused SDPA).
"""

from __future__ import annotations

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

import st_npu
from conformance.doors import TEXTS
from st_npu.engine import ShapePolicy, engine_of
from st_npu.runtime import emulation

PAIRS = [(TEXTS[i], TEXTS[(i + 2) % len(TEXTS)]) for i in range(len(TEXTS))] + [("what is x?", "x")]
POLICY = ShapePolicy(seq_lengths=(16, 64), batch_sizes=(1, 4))
CROSS_ENCODERS = {"stock": sentence_transformers.CrossEncoder, "cpu": st_npu.CrossEncoder,
                  "npu": st_npu.CrossEncoder, "patch": sentence_transformers.CrossEncoder}


def embeddings(model):
    return {
        "query": model.encode(TEXTS, prompt_name="query", batch_size=4),
        "document": model.encode_document(TEXTS, batch_size=4),
        "matryoshka": model.encode(TEXTS, truncate_dim=16, normalize_embeddings=True, convert_to_tensor=True).cpu(),
        "one": model.encode(TEXTS[1], prompt_name="query"),
    }


@pytest.mark.parametrize("shape", ["qwen3-embedder", "bge-m3"])
def test_embedder_families_encode_as_stock(conform, models, shape):
    conform(lambda door: embeddings(door.load(models[shape])))


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_reranker_scores_as_stock(conform, models, side):
    folder = models[f"qwen3-reranker-{side}"]

    def body(door):
        model = CROSS_ENCODERS[door.name](str(folder), device=door.device)
        ranked = model.rank("what is x?", TEXTS, return_documents=False)
        return {"side": model.tokenizer.padding_side, "scores": model.predict(PAIRS, batch_size=4),
                "order": [hit["corpus_id"] for hit in ranked], "ranked": np.array([hit["score"] for hit in ranked])}

    got = conform(body)
    assert got["side"] == "left"  # stock pads a causal LM on the left whatever its tokenizer config says


@needs_emulator
@pytest.mark.parametrize("shape", ["qwen3-embedder", "qwen3-reranker-left"])
def test_after_warmup_each_batch_is_one_replay_and_nothing_compiles(models, shape):
    folder = models[shape]
    reranker = "reranker" in shape
    model = (st_npu.CrossEncoder if reranker else st_npu.SentenceTransformer)(str(folder), device="npu",
                                                                             static_shapes=POLICY)
    lm_head_rows = []
    if reranker:  # every path, graph capture included, computes the LM head at the last position only
        head = model[0].auto_model.lm_head
        head.register_forward_hook(lambda module, args, out: lm_head_rows.append(args[0].shape[1]))
    model.warmup(batch_size=4, show_progress_bar=False)
    emulation.reset_counters()
    if reranker:
        result = model.predict(PAIRS, batch_size=4)
        expected = sentence_transformers.CrossEncoder(str(folder), device="cpu").predict(PAIRS, batch_size=4)
    else:
        result = model.encode(TEXTS, prompt_name="query", batch_size=4)
        expected = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(
            TEXTS, prompt_name="query", batch_size=4)
    counts = emulation.counters("npu:0")
    assert np.abs(result - expected).max() <= 1e-5
    assert counts.compiles == 0 and counts.sdpa_unfused == 0
    assert counts.replays >= 2 and counts.launches == 3 * counts.replays
    assert not reranker or set(lm_head_rows) == {1}


@needs_emulator
def test_npu_masks_keep_decoder_attention_causal(models):
    """A decoder given a padding-only 4-D mask attends both ways; on npu its tokens must equal stock's, and SDPA
    must still be handed a bool mask (the fused kernel's)."""
    folder = models["qwen3-embedder"]
    stock = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    model = st_npu.SentenceTransformer(str(folder), device="npu", static_shapes=POLICY)
    assert engine_of(model).family.causal and engine_of(model).hooks  # the hook is on, with a causal mask
    emulation.reset_counters()
    got = model.encode(TEXTS, output_value="token_embeddings", batch_size=4)
    counts = emulation.counters("npu:0")
    for ours, theirs in zip(got, stock.encode(TEXTS, output_value="token_embeddings", batch_size=4)):
        assert torch.abs(ours.cpu() - theirs).max() <= 1e-5
    assert counts.sdpa_unfused == 0
    encoder = st_npu.SentenceTransformer(str(models["bge-m3"]), device="npu")
    assert not engine_of(encoder).family.causal
