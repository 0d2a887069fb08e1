"""``st_npu.patching``: stock ``sentence_transformers.SentenceTransformer`` on NPUs without changing user code.

Covers the patch's contract (exactly what it replaces, and that undo restores the very same objects), what it
does to models built by anyone (through names imported earlier, by a real framework, per LOCAL_RANK in separate
processes), and ``st-npu run``. Multi-NPU pools are in test_multi_npu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import REPO, needs_emulator, run_cli, run_python
from sentence_transformers import SentenceTransformer as EarlyImportedST  # bound before any patch()
from sentence_transformers import util

import st_npu
from st_npu import patching
from st_npu.commands import run as run_command
from st_npu.engine import Engine, accelerate, engine_of
from st_npu.errors import UsageError
from st_npu.runtime.devices import DeviceError

StockST = sentence_transformers.SentenceTransformer
MODEL_CLASSES = tuple(getattr(sentence_transformers, name) for name in
                      ("SentenceTransformer", "CrossEncoder", "SparseEncoder", "MultiVectorEncoder")
                      if hasattr(sentence_transformers, name))  # MultiVectorEncoder: 6.3+
PATCHED = ("__init__", "start_multi_process_pool")
TEXTS = ["Hello world", "A man is eating food.", "今天天气很好。", "x", "A longer sentence with more tokens. " * 4]


@pytest.fixture(autouse=True)
def no_leftover_patch():
    yield
    patching.unpatch()


def own_attributes() -> dict[tuple[str, str], object]:
    return {(cls.__name__, name): vars(cls).get(name, "<inherited>") for cls in MODEL_CLASSES for name in PATCHED}


# --- the patch's contract ---------------------------------------------------------------------------------------


def test_undo_restores_the_very_same_objects():
    before = own_attributes()
    # stock inherits it: undo must delete, not set
    assert before[("SentenceTransformer", "start_multi_process_pool")] == "<inherited>"

    handle = patching.patch()
    assert handle.active
    assert handle.changes == [f"sentence_transformers.{cls.__name__}.{name}" for cls in MODEL_CLASSES
                              for name in PATCHED]
    assert all(vars(cls)[name] is not before[(cls.__name__, name)] for cls in MODEL_CLASSES for name in PATCHED)

    handle.undo()
    assert not handle.active
    after = own_attributes()
    assert all(after[key] is before[key] for key in before)
    handle.undo()  # a second undo changes nothing
    assert own_attributes() == after


def test_public_names():
    assert st_npu.patch is patching.patch and st_npu.unpatch is patching.unpatch


def test_context_manager_undoes_on_error():
    before = own_attributes()
    with pytest.raises(KeyError), patching.patch() as handle:
        assert handle.active
        raise KeyError("boom")
    assert not handle.active
    assert own_attributes() == before


def test_second_patch_is_a_noop_handle():
    with patching.patch() as outer:
        patched = own_attributes()
        with patching.patch() as inner:
            assert inner.changes == [] and not inner.active
        assert outer.active  # leaving the inner block did not remove the outer patch
        assert own_attributes() == patched
        with pytest.warns(RuntimeWarning, match="already active"):
            assert patching.patch(dtype="float16").changes == []


def test_unpatch_and_stale_handles():
    before = own_attributes()
    assert patching.unpatch() is False
    first = patching.patch()
    assert patching.unpatch() is True and not first.active
    second = patching.patch()
    first.undo()  # the first handle's patch is gone: it must not remove the second one
    assert second.active
    assert patching.unpatch() is True
    assert own_attributes() == before


def test_patch_and_unpatch_from_many_threads():
    before = own_attributes()
    handles: list[patching.PatchHandle] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        handles.append(patching.patch())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(bool(handle.changes) for handle in handles) == 1
    threads = [threading.Thread(target=patching.unpatch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert own_attributes() == before


def test_bad_options_fail_at_patch_time():
    with pytest.raises(ValueError, match="warmup=True needs static shapes"):
        patching.patch(static_shapes=False, warmup=True)
    with pytest.raises(ValueError, match="Unsupported dtype"):
        patching.patch(dtype="int8")
    assert own_attributes()[("SentenceTransformer", "start_multi_process_pool")] == "<inherited>"


# --- models built under the patch -------------------------------------------------------------------------------


def test_stock_model_lands_on_npu_through_an_earlier_import(tiny_cls):
    cpu = StockST(str(tiny_cls), device="cpu")
    with patching.patch():
        model = EarlyImportedST(str(tiny_cls))
        assert model.device == torch.device("npu", 0)
        np.testing.assert_allclose(model.encode(TEXTS), cpu.encode(TEXTS), atol=1e-6)
        assert EarlyImportedST(str(tiny_cls), device="npu").device == torch.device("npu", 0)
        assert EarlyImportedST(str(tiny_cls), device=torch.device("npu", 1)).device == torch.device("npu", 1)
        assert EarlyImportedST(str(tiny_cls), device="cpu").device == torch.device("cpu")  # explicit: respected
        with pytest.raises(DeviceError, match="npu:99 does not exist"):
            EarlyImportedST(str(tiny_cls), device="npu:99")
    assert StockST(str(tiny_cls), device="cpu").device == torch.device("cpu")


def test_local_rank_picks_the_process_npu(tiny_cls, monkeypatch):
    rank = torch.npu.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    with patching.patch():
        assert StockST(str(tiny_cls)).device == torch.device("npu", rank)
        assert StockST(str(tiny_cls), device="npu").device == torch.device("npu", rank)


def test_dtype_is_applied(tiny_cls):
    with patching.patch(dtype="float16"):
        model = StockST(str(tiny_cls))
    assert next(model.parameters()).dtype == torch.float16
    assert model.device == torch.device("npu", 0)


@pytest.fixture
def recorded_engines(monkeypatch) -> list[tuple[str, object, bool]]:
    """What the patch asks of the engine: each model accelerated (with whether its batches are padded) and each
    warm-up, which is recorded instead of run (a full warm-up is slow on the emulator)."""
    calls: list[tuple[str, object, bool]] = []

    def recording_accelerate(model, options):
        engine = accelerate(model, options)
        calls.append(("accelerate", model, engine.policy is not None))
        return engine

    monkeypatch.setattr(patching, "accelerate", recording_accelerate)
    monkeypatch.setattr(Engine, "warmup", lambda engine, *args, **kwargs: calls.append(("warmup", engine.model, True)))
    return calls


def test_the_engine_and_its_warmup_reach_every_stock_model(tiny_cls, recorded_engines):
    with patching.patch(warmup=True):
        on_npu = StockST(str(tiny_cls))
        on_cpu = StockST(str(tiny_cls), device="cpu")  # static_shapes=None: padding and warm-up on an NPU only
    assert recorded_engines == [("accelerate", on_npu, True), ("warmup", on_npu, True), ("accelerate", on_cpu, False)]
    recorded_engines.clear()
    with patching.patch(static_shapes=True):
        on_cpu = StockST(str(tiny_cls), device="cpu")
    with patching.patch(static_shapes=False):
        on_npu = StockST(str(tiny_cls))
    assert recorded_engines == [("accelerate", on_cpu, True), ("accelerate", on_npu, False)]


def test_real_static_shapes_reach_stock_models(tiny_cls):
    with patching.patch():
        model = StockST(str(tiny_cls))
    assert engine_of(model).policy is not None
    np.testing.assert_allclose(model.encode(TEXTS), StockST(str(tiny_cls), device="cpu").encode(TEXTS), atol=1e-6)


def test_st_npu_models_are_left_alone(tiny_cls, recorded_engines):
    with patching.patch(dtype="float16"):
        model = st_npu.SentenceTransformer(str(tiny_cls), device="npu:1")
    assert model.device == torch.device("npu", 1)
    assert next(model.parameters()).dtype == torch.float32  # its own dtype argument, not the patch's
    assert recorded_engines == []


@needs_emulator
def test_without_an_npu_the_device_stays_stock(tiny_cls):
    result = run_python(
        "import sentence_transformers, st_npu.patching as p\n"
        "with p.patch():\n"
        f"    print(sentence_transformers.SentenceTransformer({str(tiny_cls)!r}).device)\n",
        env={"ST_NPU_EMULATE": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "cpu"


RANKS = (1, 3)  # with st-npu run's LOCAL_RANK=2 below: three ranks, each in its own process


@needs_emulator
def test_each_local_rank_uses_its_own_npu(tiny_cls):
    code = ("import sentence_transformers, st_npu\n"
            "st_npu.patch()\n"
            f"print(sentence_transformers.SentenceTransformer({str(tiny_cls)!r}).device)\n")
    ranks = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "ST_NPU_EMULATE": "8", "LOCAL_RANK": str(rank)})
             for rank in RANKS]
    for rank, process in zip(RANKS, ranks, strict=True):
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        assert out.split()[-1] == f"npu:{rank}"


# --- st-npu run -------------------------------------------------------------------------------------------------


SCRIPT = """\
import sys
import sentence_transformers
from embed_helper import MODEL  # a module beside the script: its folder is on sys.path as with `python script.py`
print("argv", sys.argv)
print("name", __name__)
print("device", sentence_transformers.SentenceTransformer(MODEL).device)
if "--fail" in sys.argv:
    raise ValueError("the script failed")
if "--message" in sys.argv:
    sys.exit("bye")
sys.exit(7)
"""


@pytest.fixture
def script(tmp_path, tiny_cls) -> Iterator[Path]:
    (tmp_path / "embed_helper.py").write_text(f"MODEL = {str(tiny_cls)!r}\n")
    path = tmp_path / "embed.py"
    path.write_text(SCRIPT)
    yield path
    sys.modules.pop("embed_helper", None)


def test_run_script_in_process(script, capsys):
    before, argv, path = own_attributes(), sys.argv, sys.path[:]
    assert run_command.run_script(str(script), ["a", "--b"]) == 7
    out = capsys.readouterr().out
    assert f"argv {[str(script), 'a', '--b']}" in out
    assert "name __main__" in out and "device npu:0" in out
    assert sys.argv is argv and sys.path == path and own_attributes() == before


def test_run_script_errors(script, capsys):
    assert run_command.run_script(str(script), ["--fail"]) == 1
    err = capsys.readouterr().err
    traceback = err[err.index("Traceback (most recent call last):"):]
    assert f'File "{script}", line 8' in traceback and "runpy" not in traceback and "st_npu" not in traceback
    assert "ValueError: the script failed" in err
    assert run_command.run_script(str(script), ["--message"]) == 1
    assert capsys.readouterr().err.endswith("\nbye\n")
    broken = script.with_name("broken.py")
    broken.write_text("print('never'\n")
    assert run_command.run_script(str(broken), []) == 1
    assert "SyntaxError" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no such script"):
        run_command.run_script(str(script.with_name("missing.py")), [])
    assert own_attributes()[("SentenceTransformer", "start_multi_process_pool")] == "<inherited>"


@needs_emulator
def test_cli_run_with_local_rank(script):
    result = run_cli("run", str(script), "x", "--y", env={"ST_NPU_EMULATE": "8", "LOCAL_RANK": "2"})
    assert result.returncode == 7, result.stderr
    assert f"argv {[str(script), 'x', '--y']}" in result.stdout
    assert "device npu:2" in result.stdout


# --- a real framework -------------------------------------------------------------------------------------------

DOCUMENTS = [
    "The Eiffel Tower is in Paris.",
    "Python is a programming language.",
    "Bananas are yellow fruit rich in potassium.",
    "The Great Wall of China is thousands of kilometres long.",
    "Ascend NPUs are AI accelerators made by Huawei.",
    "A cat sleeps on the warm windowsill.",
    "Football is played with a round ball.",
    "The stock market fell sharply on Monday.",
]
QUERIES = ["Which city has the Eiffel Tower?", "Tell me about Huawei AI chips.", "What fruit is yellow?"]


def test_llama_index_retrieval_on_npu(minilm, tmp_path):
    embeddings = pytest.importorskip(
        "llama_index.embeddings.huggingface",
        reason="LlamaIndex is not installed: pip install llama-index-embeddings-huggingface",
    )
    cpu = StockST(str(minilm), device="cpu")
    expected = util.semantic_search(cpu.encode(QUERIES, normalize_embeddings=True, convert_to_tensor=True),
                                    cpu.encode(DOCUMENTS, normalize_embeddings=True, convert_to_tensor=True), top_k=3)
    with patching.patch():
        # LlamaIndex builds its own stock SentenceTransformer. Without a device it picks cpu itself (it knows
        # cuda and mps only), so the NPU is asked for by name: the patch resolves "npu" and loads torch_npu.
        embedder = embeddings.HuggingFaceEmbedding(model_name=str(minilm), device="npu", cache_folder=str(tmp_path))
    assert embedder._model.device == torch.device("npu", 0)
    documents = torch.tensor(embedder.get_text_embedding_batch(DOCUMENTS))
    queries = torch.tensor([embedder.get_query_embedding(query) for query in QUERIES])
    found = util.semantic_search(queries, documents, top_k=3)
    assert [[hit["corpus_id"] for hit in hits] for hits in found] == [[hit["corpus_id"] for hit in hits]
                                                                      for hits in expected]
    assert [hits[0]["corpus_id"] for hits in found] == [0, 4, 2]
    np.testing.assert_allclose([[hit["score"] for hit in hits] for hits in found],
                               [[hit["score"] for hit in hits] for hits in expected], atol=1e-5)
