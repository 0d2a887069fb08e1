"""The conformance suite's fixtures: the door each test runs through, ``conform``, and the model folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance.doors import DOORS, STOCK, Door, assert_same, outcome
from st_npu.testing import fixtures

_references: dict[tuple, Any] = {}


@pytest.fixture(params=list(DOORS))
def door(request: pytest.FixtureRequest) -> Door:
    return DOORS[request.param]


@pytest.fixture
def conform(request: pytest.FixtureRequest, door: Door) -> Callable[[Callable[[Door], Any]], Any]:
    """``conform(body)``: run ``body`` against stock (once per test and parameters, shared by the doors) and
    through this test's door; assert the outcomes are the same and return st_npu's."""
    params = {key: value for key, value in request.node.callspec.params.items() if key != "door"}
    key = (request.node.path, request.node.originalname, repr(sorted(params.items())))

    def run(body: Callable[[Door], Any]) -> Any:
        if key not in _references:
            _references[key] = outcome(body, STOCK)
        got = outcome(body, door)
        assert_same(_references[key], got, f"{door.name} door")
        return got

    return run


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small folder per model type, built on first use."""
    root = tmp_path_factory.mktemp("conformance")
    builders = {
        "transformer": lambda folder: fixtures.bert_folder(folder, fixtures.TINY, pooling="mean"),
        "static": fixtures.static_folder,
        "words": fixtures.word_embeddings_folder,
        "router": fixtures.router_folder,
        "custom": fixtures.custom_module_folder,
        "minilm": lambda folder: fixtures.minilm_folder(),
        "qwen3-embedder": fixtures.qwen3_embedder_folder,
        "qwen3-reranker-left": lambda folder: fixtures.qwen3_reranker_folder(folder, "left"),
        "qwen3-reranker-right": lambda folder: fixtures.qwen3_reranker_folder(folder, "right"),
        "bge-m3": fixtures.bge_m3_folder,
        "reranker": fixtures.cross_encoder_folder,
        "splade": fixtures.splade_folder,
        "multi_vector": fixtures.multi_vector_folder,
        "lstm": fixtures.lstm_folder,
    }

    class Folders(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = Path(builders[name](root / name))
            return self[name]

    return Folders()
