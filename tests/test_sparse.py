"""Stock ``SparseEncoder`` (SPLADE) under ``st_npu.patch()`` on the emulated npu: the engine pads its batches to
static shapes, runs a call in sequence-bucket groups (stock stacks the rows, as stock does for the whole call) and the
sparse embeddings equal stock's on the CPU."""

from __future__ import annotations

import pytest
import sentence_transformers
import torch
from conftest import needs_emulator

import st_npu
from st_npu.engine import engine_of
from st_npu.emulator import backend as emulator
from st_npu.evaluation.workloads import mixed_corpus
from st_npu.testing.fixtures import TINY, TOKENIZER_FILES, minilm_folder

TEXTS = mixed_corpus(12)


@pytest.fixture(scope="module")
def splade_folder(tmp_path_factory):
    import shutil

    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("splade")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=30522, max_position_embeddings=512, **TINY)).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, folder / name)
    return folder


def _sparse(folder, device):
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    return sentence_transformers.SparseEncoder(modules=[MLMTransformer(str(folder)), SpladePooling("max")],
                                               device=device)


@needs_emulator
def test_patch_pads_a_stock_sparse_encoder_and_keeps_its_embeddings(splade_folder):
    expected = _sparse(splade_folder, "cpu").encode(TEXTS, batch_size=5, convert_to_sparse_tensor=False)
    with st_npu.patch():
        model = _sparse(splade_folder, "npu:6")
    engine = engine_of(model)
    assert engine is not None and engine.policy is not None and engine.kind.grouped
    shapes = []
    model[0].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0]["input_ids"].shape)))
    emulator.reset_stats()
    got = model.encode(TEXTS, batch_size=5, convert_to_sparse_tensor=False)
    assert all((rows, tokens) in [(r, t) for r in engine.policy.batch_sizes for t in engine.policy.seq_lengths]
               for rows, tokens in shapes)
    assert (got.cpu() - expected).abs().max() <= 1e-5


@needs_emulator
def test_a_sparse_call_runs_in_bucket_groups_and_returns_stock_rows(splade_folder):
    expected = _sparse(splade_folder, "cpu").encode(TEXTS, batch_size=len(TEXTS))
    with st_npu.patch():
        model = _sparse(splade_folder, "npu:5")
    policy = engine_of(model).policy
    tokens = model.tokenizer(TEXTS, truncation=True, max_length=model.max_seq_length)["input_ids"]
    lengths = sorted({policy.seq_bucket(len(ids)) for ids in tokens})
    assert len(lengths) > 1  # the workload spans buckets, else there is nothing to group
    shapes = []
    model[0].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0]["input_ids"].shape)))
    got = model.encode(TEXTS, batch_size=len(TEXTS))
    assert sorted(tokens for _, tokens in shapes) == lengths  # one batch per bucket, not one padded to the longest
    assert got.is_sparse and got.device == torch.device("npu:5")
    assert (got.to_dense().cpu() - expected.to_dense()).abs().max() <= 1e-5


@needs_emulator
def test_a_warmed_up_sparse_encoder_keeps_stock_rows_on_its_npu(splade_folder):
    """Warm-up captures no graph for a sparse encoder (a replay would hand stock dense host rows where it makes its
    sparse rows on the device): after it, rows stay stock's and on the model's npu."""
    expected = _sparse(splade_folder, "cpu").encode(TEXTS[:4])
    with st_npu.patch():
        model = _sparse(splade_folder, "npu:4")
    engine = engine_of(model)
    assert engine.graphs is None
    engine.warmup(batch_size=2, max_tokens=256, show_progress_bar=False)
    got = model.encode(TEXTS[:4])
    assert got.is_sparse and got.device == torch.device("npu:4")
    assert (got.to_dense().cpu() - expected.to_dense()).abs().max() <= 1e-5
