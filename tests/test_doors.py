"""The same folder through three doors, on the emulated npu: ``st_npu.SentenceTransformer``, stock
``SentenceTransformer`` under ``st_npu.patch()``, and stock under ``st-npu run`` (a script that knows nothing of
st_npu). One engine serves all three, so every feature must behave identically: outputs, launches per batch,
compiles after warm-up, out-of-memory backoff, prefetch hits, llm-embedder's 256-token query limit and the input
check's message. Counts come from the emulated npu: device plumbing, not Ascend speed.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import sentence_transformers
from conftest import needs_emulator, run_cli

import st_npu
from st_npu.testing.fixtures import TINY, bert_folder

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "doors"))
import probe  # noqa: E402

pytestmark = needs_emulator


@pytest.fixture(scope="module")
def llm_named(tmp_path_factory):
    """A tiny BERT in a folder named as the hub names llm-embedder: the known-model spec applies by name."""
    return bert_folder(tmp_path_factory.mktemp("doors") / "BAAI--llm-embedder", TINY, pooling="cls")


@pytest.fixture(scope="module")
def doors(llm_named):
    results = {"class": probe.probe(st_npu.SentenceTransformer(llm_named, device="npu:0"))}
    with st_npu.patch():
        results["patch"] = probe.probe(sentence_transformers.SentenceTransformer(str(llm_named), device="npu:1"))
    ran = run_cli("run", probe.__file__, str(llm_named), env={"ST_NPU_EMULATE": "2", "LOCAL_RANK": "1"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    results["run"] = json.loads(ran.stdout.strip().splitlines()[-1])
    return results


def test_every_door_gets_the_engine_on_the_npu(doors):
    assert {door: (result["engine"], result["device"]) for door, result in doors.items()} == {
        "class": (True, "npu:0"), "patch": (True, "npu:1"), "run": (True, "npu:1")}


@pytest.mark.parametrize("key", ["rows", "oom_rows"])
def test_outputs_agree(doors, key):
    reference = np.array(doors["class"][key])
    for door in ("patch", "run"):
        assert np.abs(np.array(doors[door][key]) - reference).max() <= 1e-6, door


def test_oom_backoff_gives_every_door_the_rows_of_an_unconstrained_device(doors, llm_named):
    expected = sentence_transformers.SentenceTransformer(str(llm_named), device="cpu").encode(probe.TEXTS)
    assert np.abs(np.array(doors["run"]["oom_rows"]) - expected).max() <= 1e-6


@pytest.mark.parametrize("key", ["query_tokens", "compiles_after_warmup", "launches_per_replay", "replays",
                                 "prefetch", "bad_input"])
def test_features_agree(doors, key):
    assert doors["class"][key] == doors["patch"][key] == doors["run"][key]


def test_what_the_features_are(doors):
    result = doors["class"]
    assert result["query_tokens"] == 256  # llm-embedder's FlagEmbedding query limit, below the model's 512
    assert result["compiles_after_warmup"] == 0 and result["replays"] >= 3 and result["launches_per_replay"] == 3
    assert result["prefetch"]["hits"] >= 1
    assert result["bad_input"][0] == "InvalidInputError" and "index 1" in result["bad_input"][1]
