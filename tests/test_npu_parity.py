"""NPU against CPU parity, on the emulated npu in CI and on a real Ascend NPU with ST_NPU_TEST_DEVICE=npu.

On the emulator the kernels are the CPU's, so fp32 must match to 1e-6; that proves the device plumbing, not Ascend
numerics. On hardware the same tests check Ascend's kernels, with tolerances for their different accumulation.
"""

from __future__ import annotations

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import HARDWARE_DEVICE

import st_npu
from st_npu.evaluation.workloads import mixed_corpus, seed_sentences

TEXTS = seed_sentences() + mixed_corpus(9)
# (device, max abs difference allowed in fp32, min cosine allowed in fp16)
TARGETS = {
    "emulated": ("npu:3", 1e-6, 0.999),
    "ascend": (HARDWARE_DEVICE or "npu", 1e-4, 0.999),
}


@pytest.fixture(params=list(TARGETS))
def target(request):
    if request.param == "emulated" and HARDWARE_DEVICE:
        pytest.skip("the emulator is not installed on real hardware (ST_NPU_TEST_DEVICE is set)")
    if request.param == "ascend" and not HARDWARE_DEVICE:
        pytest.skip("needs an Ascend NPU with torch_npu and CANN: set ST_NPU_TEST_DEVICE=npu")
    return TARGETS[request.param]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("fixture", ["minilm", "minilm_cls"])
def test_fp32_matches_cpu(target, fixture, request):
    device, tolerance, _ = target
    folder = request.getfixturevalue(fixture)
    expected = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    model = st_npu.SentenceTransformer(folder, device=device)
    assert model.device == torch.device(device if ":" in device else f"{device}:0")
    assert np.abs(model.encode(TEXTS, batch_size=8) - expected).max() <= tolerance


def test_fp16_is_close_to_cpu_fp32(target, minilm):
    device, _, min_cosine = target
    expected = sentence_transformers.SentenceTransformer(str(minilm), device="cpu").encode(TEXTS)
    got = st_npu.SentenceTransformer(minilm, device=device, dtype="float16").encode(TEXTS, batch_size=8)
    assert cosines(got, expected).min() >= min_cosine


def test_stock_sentence_transformers_runs_on_npu_once_st_npu_is_imported(target, minilm):
    device, tolerance, _ = target
    stock = sentence_transformers.SentenceTransformer(str(minilm), device=device)
    expected = sentence_transformers.SentenceTransformer(str(minilm), device="cpu").encode(TEXTS[:8])
    assert np.abs(stock.encode(TEXTS[:8]) - expected).max() <= tolerance
