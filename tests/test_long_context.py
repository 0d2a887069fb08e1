"""Long inputs: geometric buckets to any max_seq_length, a token budget per batch, warm-up bounded by it, and
non-finite outputs as an error (the class, ``st-npu embed``, ``st-npu verify``, the server)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import needs_emulator, run_cli

import st_npu
from st_npu.emulator import backend as emulator
from st_npu.engine import ShapePolicy, engine_of
from st_npu.engine.static_shapes import DEFAULT_MAX_BATCH_TOKENS
from st_npu.errors import NonFiniteError
from st_npu.evaluation import verify
from st_npu.testing import fixtures

BUDGET = 8192
BATCH = 4
LENGTHS = sorted({round(10 * (8000 / 10) ** (i / 23)) for i in range(24)})  # 10 to 8,000 tokens, geometric


def test_geometric_buckets_bound_padding_at_any_length_and_the_budget_bounds_rows():
    for longest in (512, 8192, 32768):
        policy = ShapePolicy().for_model(longest)
        assert policy.seq_lengths[0] == 16 and policy.seq_lengths[-1] == longest
        assert all(length % 8 == 0 for length in policy.seq_lengths)
        # A text pays at most 1.5x its own tokens (from the shortest bucket on).
        assert max(policy.seq_bucket(n) / n for n in range(16, longest + 1)) <= 1.5
        shapes = policy.shapes(32, DEFAULT_MAX_BATCH_TOKENS)
        assert len(shapes) < 200 and all(rows * length <= DEFAULT_MAX_BATCH_TOKENS or rows == 1
                                         for rows, length in shapes)
    policy = ShapePolicy().for_model(8192)
    assert [policy.rows_for(n, 32, 16384) for n in (100, 512, 600, 5000, 8192)] == [32, 32, 16, 2, 2]
    assert policy.rows_for(8192, 32, 4096) == 1  # longer than the budget: alone
    assert ShapePolicy(seq_lengths=(16, 64)).for_model(128).seq_lengths == (16, 64, 128)  # explicit ones kept


@pytest.fixture(scope="module")
def xlmr_long(tmp_path_factory):
    return fixtures.bge_m3_folder(tmp_path_factory.mktemp("xlmr") / "xlmr-8192", max_seq_length=8192)


def _texts(model):
    engine = engine_of(model)
    return [engine.sample_input(n) for n in LENGTHS]


@needs_emulator
def test_long_documents_pad_at_most_2x_stay_in_the_budget_and_replay_without_compiling(xlmr_long):
    padded_model = st_npu.SentenceTransformer(xlmr_long, device="npu:3", graphs=False, max_batch_tokens=BUDGET)
    texts = _texts(padded_model)
    real = [int(row.sum()) for row in padded_model.tokenize(texts)["attention_mask"]]
    assert min(real) <= 16 and max(real) >= 7000
    batches = []
    padded_model[0].register_forward_pre_hook(lambda module, args: batches.append(args[0]["input_ids"].shape))
    eager = padded_model.encode(texts, batch_size=BATCH)
    assert all(rows * length <= BUDGET for rows, length in batches)
    assert sum(rows * length for rows, length in batches) / sum(real) <= 2.0

    stock = sentence_transformers.SentenceTransformer(str(xlmr_long), device="cpu")
    expected = stock.encode(texts, batch_size=BATCH)
    assert np.abs(eager - expected).max() <= 1e-6

    model = st_npu.SentenceTransformer(xlmr_long, device="npu:4", max_batch_tokens=BUDGET)
    engine = engine_of(model)
    shapes = engine.shapes(BATCH)
    assert model.warmup(batch_size=BATCH, show_progress_bar=False) == len(shapes)
    assert len(engine.graphs.graphs) == len(shapes) and all(rows * length <= BUDGET for rows, length in shapes)
    emulator.reset_stats()
    got = model.encode(texts, batch_size=BATCH)
    counts = emulator.stats()["per_device"][4]
    policy = engine.policy
    groups = {}
    for n in real:
        groups[policy.seq_bucket(n)] = groups.get(policy.seq_bucket(n), 0) + 1
    expected_batches = sum(math.ceil(count / policy.rows_for(bucket, BATCH, BUDGET)) for bucket, count in groups.items())
    assert counts["compiles"] == 0
    assert counts["replays"] == expected_batches and counts["launches"] == 3 * expected_batches
    assert np.abs(got - expected).max() <= 1e-6


@pytest.fixture(scope="module")
def overflowing(tiny_cls, tmp_path_factory):
    """tiny_cls with the embedding of "zebra" past float16's range: in float16 every text holding it overflows."""
    folder = tmp_path_factory.mktemp("overflow") / "tiny-overflow"
    shutil.copytree(tiny_cls, folder)
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    token = model.tokenizer.convert_tokens_to_ids("zebra")
    with torch.no_grad():
        model[0].auto_model.embeddings.word_embeddings.weight[token] = 70000.0
    model.save(str(folder))
    return folder


TEXTS = ["a quiet morning", "the zebra runs", "two cats", "a zebra and a horse"]


def test_a_float16_overflow_raises_naming_inputs_dtype_and_fix(overflowing):
    assert np.isfinite(st_npu.SentenceTransformer(overflowing, device="cpu").encode(TEXTS)).all()
    model = st_npu.SentenceTransformer(overflowing, device="cpu", dtype="float16")
    stock = sentence_transformers.SentenceTransformer(str(overflowing), device="cpu").to(torch.float16)
    assert np.isnan(stock.encode(TEXTS)[[1, 3]]).all()  # stock hands the NaN rows back silently
    with pytest.raises(NonFiniteError, match=r"2 of 4 inputs \(indices 1, 3\).*float16.*bfloat16") as caught:
        model.encode(TEXTS)
    assert isinstance(caught.value, FloatingPointError) and caught.value.indices == [1, 3]
    with pytest.raises(NonFiniteError, match="indices 0"):
        model.encode("zebra")
    with pytest.raises(NonFiniteError):
        model.encode(TEXTS, convert_to_tensor=True)
    report = verify.verify(model, verify.encode(st_npu.SentenceTransformer(overflowing, device="cpu"), TEXTS), TEXTS)
    assert not report["passed"] and report["non_finite_rows"] == [1, 3]
    assert "NaN or infinite" in report["failures"][0]


def test_embed_exits_non_zero_without_writing_nan_and_verify_fails(overflowing, tmp_path):
    output = tmp_path / "vectors.npy"
    result = run_cli("embed", "--model", str(overflowing), "--device", "cpu", "--dtype", "float16",
                     *[arg for text in TEXTS for arg in ("--text", text)], "--output", str(output))
    assert result.returncode != 0 and not output.exists()
    assert "indices 1, 3" in result.stderr and "bfloat16" in result.stderr
    texts = tmp_path / "texts.txt"
    texts.write_text("the zebra\n", encoding="utf-8")
    report = tmp_path / "verify.json"
    result = run_cli("verify", "--model", str(overflowing), "--device", "cpu", "--dtype", "float16",
                     "--texts", str(texts), "--json", str(report))
    assert result.returncode != 0
    assert json.loads(report.read_text())["non_finite_rows"] == [23]


def test_the_server_answers_an_error_for_a_float16_overflow(overflowing):
    pytest.importorskip("fastapi")
    from test_serve import Server, post

    server = Server(overflowing, "--device", "cpu", "--dtype", "float16")
    try:
        fine = post(server, "/embed", {"inputs": ["two cats"]})
        assert fine.status_code == 200 and np.isfinite(fine.json()).all()
        answer = post(server, "/embed", {"inputs": ["the zebra runs"]})
        assert answer.status_code >= 400 and "NaN" in answer.json()["error"]
        assert answer.json()["error_type"]
    finally:
        assert server.stop() == 0


def test_a_row_too_long_for_the_device_alone_names_its_index_tokens_and_a_length_that_fits(tiny_cls):
    model = st_npu.SentenceTransformer(tiny_cls, device="cpu")

    def oom(module, args):  # a device that holds at most 8 rows of 40 tokens, or one row of 40
        rows, length = args[0]["input_ids"].shape
        if rows * length > 320 or length > 40:
            raise torch.OutOfMemoryError("injected: NPU out of memory")

    model[0].register_forward_pre_hook(oom)
    texts = ["short one", "another short text", " ".join(["word"] * 98), "last"]
    with pytest.raises(torch.OutOfMemoryError, match=r"input 2 \(100 tokens\) alone; it would fit truncated to "
                                                     r"(3[3-9]|40) tokens") as caught:
        model.encode(texts, batch_size=8)
    assert (caught.value.index, caught.value.tokens) == (2, 100) and 32 < caught.value.fits <= 40
    assert model.encode(texts[:2] + texts[3:], batch_size=8).shape == (3, 32)  # what fits still runs


@pytest.mark.parametrize("devices", [["cpu"], ["npu:0", "npu:1"]], ids=["in-process", "two-workers"])
def test_embed_corpus_stops_on_a_float16_overflow_naming_input_rows_and_keeps_finished_shards(overflowing, tmp_path,
                                                                                               devices):
    pytest.importorskip("pyarrow", reason='the corpus job needs pyarrow: pip install "st-npu[corpus]"')
    texts = [f"a quiet line {index}" for index in range(8)] + ["the zebra runs"] + ["two cats"] * 3
    source = tmp_path / "in.txt"
    source.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    output = tmp_path / "out"
    result = run_cli("embed-corpus", str(source), "--model", str(overflowing), "--dtype", "float16", "--output",
                     str(output), "--shard-size", "4", "--devices", ",".join(devices),
                     env={"ST_NPU_EMULATE": "2"} if devices != ["cpu"] else None, timeout=600)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "shard 2" in message and "indices 8)" in message and "bfloat16" in message
    assert "Traceback" not in result.stderr
    if devices == ["cpu"]:  # in order, on one device: the two shards before the overflowing one are kept
        manifest = json.loads((output / "_manifest.json").read_text())
        assert len(manifest["shards"]) == 2 and (output / "part-00001.parquet").exists()
