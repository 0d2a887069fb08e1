"""st-npu verify: the comparison math, the verdict and exit codes, saved references, the emulated npu."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_folder, needs_emulator, run_cli

import st_npu
from st_npu import cli
from st_npu.evaluation import verify as check

REPORT_KEYS = {"mean_cosine", "min_cosine", "pearson", "error_rate_percent", "passed", "device", "dtype", "versions",
               "model", "max_abs_diff", "worst", "neighbours"}


def embeddings(rows: int = 12, dimension: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dimension)).astype(np.float32)


def texts(rows: int = 12) -> list[str]:
    return [f"text {row}" for row in range(rows)]


def verify_cli(*args: str) -> int:
    return cli.main(["verify", *map(str, args)])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the math ---------------------------------------------------------------------------------------------


def test_identical_embeddings_are_perfect():
    reference = embeddings()
    report = check.compare(reference, reference.copy(), texts())
    assert report["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert report["min_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert report["pearson"] == pytest.approx(1.0, abs=1e-12)
    assert report["error_rate_percent"] == pytest.approx(0.0, abs=1e-10)
    assert report["max_abs_diff"] == 0.0
    assert report["neighbours"] == {"k": 5, "agreement": 1.0, "differing": []}
    assert report["passed"] and report["failures"] == []


def test_perturbation_lowers_the_figures():
    reference = embeddings()
    noise = embeddings(seed=1)
    target = reference + 0.3 * noise
    report = check.compare(reference, target, texts())
    expected = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
                for a, b in zip(reference.astype(float), target.astype(float))]
    assert report["cosines"] == pytest.approx(expected, abs=1e-9)
    assert report["mean_cosine"] == pytest.approx(np.mean(expected))
    assert report["min_cosine"] == pytest.approx(min(expected)) and report["worst"]["index"] == int(np.argmin(expected))
    assert report["worst"]["text"] == texts()[int(np.argmin(expected))]
    assert report["error_rate_percent"] == pytest.approx((1 - np.mean(expected)) * 100)
    assert report["error_rate_percent"] > 1
    assert report["pearson"] < 1.0
    assert report["max_abs_diff"] == pytest.approx(float(np.abs(target - reference).max()))
    assert not report["passed"] and "error rate" in report["failures"][0]


def test_cosines_ignore_length_and_stay_in_range():
    reference = embeddings()
    assert check.cosines(reference, 3 * reference) == pytest.approx(np.ones(12))
    assert check.cosines(reference, -reference) == pytest.approx(-np.ones(12))
    assert check.cosines(reference, reference * 7.1).max() <= 1.0  # rounding never pushes an error rate below 0


def test_pearson_is_numpy_corrcoef():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(50), rng.standard_normal(50)
    assert check.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert check.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert check.pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(check.pearson(np.ones(5), x[:5]))
    with pytest.raises(ValueError):
        check.pearson(x, y[:10])


def test_pearson_of_the_off_diagonal_upper_triangles():
    reference, target = embeddings(), embeddings() + 0.2 * embeddings(seed=2)

    def cosine_matrix(rows: np.ndarray) -> np.ndarray:
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return unit @ unit.T

    upper = np.triu_indices(12, k=1)
    reference_pairs = cosine_matrix(reference.astype(float))[upper]
    expected = np.corrcoef(reference_pairs, cosine_matrix(target.astype(float))[upper])[0, 1]
    assert check.compare(reference, target, texts())["pearson"] == pytest.approx(expected, abs=1e-12)
    assert check.upper_triangle(np.arange(9).reshape(3, 3)).tolist() == [1, 2, 5]


def test_neighbour_differences():
    reference = np.array([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.2, 0.3], [0.1, 0.2, 1.0, 0.97], [0.0, 0.3, 0.97, 1.0]])
    target = reference.copy()
    target[0, 2] = target[2, 0] = 0.95  # text 0 now finds text 2 first; text 2's nearest is still text 3
    assert check.top_neighbours(reference, 1).ravel().tolist() == [1, 0, 3, 2]  # never the text itself
    for k, differing in ((1, [0]), (3, [])):  # with k=3 text 0 has the same neighbours in another order
        tops = check.top_neighbours(reference, k), check.top_neighbours(target, k)
        assert check.neighbour_differences(*tops) == differing


def test_failures_verdict():
    assert check.failures(0.5, 0.995, threshold=1.0) == []
    assert check.failures(0.1, 0.99, threshold=1.0) == []  # Pearson 0.99 is enough
    assert check.failures(1.0, 1.0, threshold=1.0) == ["error rate 1.000000 % is not under 1 %"]
    assert check.failures(0.0, 1.0, threshold=0.0)  # a zero threshold never passes, not even a perfect match
    assert check.failures(0.1, 0.98, threshold=1.0) == ["similarity Pearson 0.980000 is below 0.99"]
    assert check.failures(0.1, math.nan, threshold=1.0)


def test_compare_refuses_bad_input():
    with pytest.raises(ValueError, match="shape"):
        check.compare(embeddings(), embeddings(rows=11), texts())
    with pytest.raises(ValueError, match="threshold -1"):
        check.compare(embeddings(), embeddings(), texts(), threshold=-1)


def test_identity_differences_name_what_differs():
    saved = {"spec": None, "files": {"config.json": "a", "1_Pooling/config.json": "b", "model.safetensors": "c"}}
    assert check.identity_differences(saved, json.loads(json.dumps(saved))) == []
    current = {"spec": "llm-embedder", "files": {"config.json": "a", "1_Pooling/config.json": "B", "vocab.txt": "d"}}
    assert check.identity_differences(saved, current) == [
        "known-model spec none vs llm-embedder",
        "different content: 1_Pooling/config.json",
        "only in the reference's model: model.safetensors",
        "only in this model: vocab.txt",
    ]


# --- the command ------------------------------------------------------------------------------------------


def test_bf16_on_cpu_passes(minilm, tmp_path):
    result = run_cli("verify", "--model", str(minilm), "--device", "cpu", "--dtype", "bfloat16",
                     "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    report = read_json(tmp_path / "report.json")
    assert REPORT_KEYS <= set(report)
    assert (report["device"], report["dtype"], report["count"], report["dimension"]) == ("cpu", "bfloat16", 23, 384)
    assert report["reference"] == {"source": "computed", "device": "cpu", "dtype": "float32"}
    assert 0 < report["error_rate_percent"] < 1.0 and report["pearson"] >= 0.99 and report["passed"]
    assert 0.99 < report["min_cosine"] <= report["mean_cosine"] < 1.0
    assert set(report["versions"]) == {"torch", "torch_npu", "sentence_transformers", "transformers", "st_npu"}
    assert report["versions"]["st_npu"] == st_npu.__version__
    assert "PASSED" in result.stdout and "error rate" in result.stdout and "bfloat16" in result.stdout


def test_zero_threshold_fails(tiny_cls, tmp_path, capsys):
    assert verify_cli("--model", tiny_cls, "--device", "cpu", "--threshold", "0", "--json", tmp_path / "r.json") == 1
    report = read_json(tmp_path / "r.json")
    assert report["passed"] is False and report["error_rate_percent"] < 1e-6  # a perfect match still fails
    assert "FAILED: error rate" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--threshold", "-1"], "threshold -1.0 % is not a valid error rate"),
    (["--json", "missing/report.json"], "does not exist"),
    (["--device", "npu:99"], "npu:99 does not exist"),
    (["--reference", "missing.npz"], "missing.npz"),
])
def test_usage_errors_exit_2(tiny_cls, arguments, message, capsys):
    assert verify_cli("--model", tiny_cls, *arguments) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_reference(tiny_cls, tmp_path_factory) -> Path:
    # The target device is never opened when saving, so a CPU-only machine can make the reference.
    path = tmp_path_factory.mktemp("reference") / "ref.npy"
    assert verify_cli("--model", tiny_cls, "--device", "npu:99", "--save-reference", path) == 0
    return path


def test_saved_reference_is_one_file_without_pickles(tiny_reference, tiny_cls):
    assert [path.name for path in tiny_reference.parent.iterdir()] == ["ref.npy"]
    with np.load(tiny_reference, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["embeddings", "metadata"]
    embeddings_, metadata = check.load_reference(tiny_reference)
    assert embeddings_.shape == (23, 32) and embeddings_.dtype == np.float32
    assert (metadata["count"], metadata["dimension"], metadata["device"]) == (23, 32, "cpu")
    assert metadata["dtype"] == "float32"
    assert metadata["texts_sha256"] == check.texts_sha256(check.verify_texts())
    files = set(metadata["identity"]["files"])
    assert {"config.json", "modules.json", "1_Pooling/config.json", "model.safetensors"} <= files
    assert set(metadata["versions"]) >= {"torch", "sentence_transformers", "transformers", "st_npu"}


def test_saved_reference_gives_the_same_numbers(tiny_reference, tiny_cls, tmp_path):
    common = ["--model", tiny_cls, "--device", "cpu", "--dtype", "bfloat16"]
    assert verify_cli(*common, "--reference", tiny_reference, "--json", tmp_path / "loaded.json") in (0, 1)
    assert verify_cli(*common, "--json", tmp_path / "computed.json") in (0, 1)
    loaded, computed = read_json(tmp_path / "loaded.json"), read_json(tmp_path / "computed.json")
    assert loaded.pop("reference")["source"] == str(tiny_reference)
    computed.pop("reference")
    assert loaded == computed and loaded["error_rate_percent"] > 0


def test_reference_survives_copying_the_model_folder(tiny_reference, tiny_cls, tmp_path):
    copy = copy_folder(tiny_cls, tmp_path / "elsewhere")
    assert verify_cli("--model", copy, "--device", "cpu", "--reference", tiny_reference) == 0


def test_reference_of_another_model_is_refused(minilm, minilm_cls, tmp_path, capsys):
    reference = tmp_path / "minilm.npz"
    assert verify_cli("--model", minilm, "--save-reference", reference) == 0
    # Same weights and config.json, other pooling: still another model.
    assert verify_cli("--model", minilm_cls, "--device", "cpu", "--reference", reference) == 2
    error = capsys.readouterr().err
    assert "saved from another model" in error and "different content: 1_Pooling/config.json" in error


def test_reference_of_other_texts_is_refused(tiny_reference, tiny_cls, tmp_path, capsys):
    extra = tmp_path / "extra.txt"
    extra.write_text("one more text\n", encoding="utf-8")
    assert verify_cli("--model", tiny_cls, "--device", "cpu", "--texts", extra, "--reference", tiny_reference) == 2
    error = capsys.readouterr().err
    assert "holds other texts: 23 texts (the built-in 23" in error and f"24 (the built-in 23 and {extra}" in error


def test_other_files_are_not_references(tiny_cls, tmp_path, capsys):
    np.save(tmp_path / "plain.npy", embeddings())
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "empty.npz").write_bytes(b"")
    for name in ("plain.npy", "junk.npz", "empty.npz"):
        assert verify_cli("--model", tiny_cls, "--reference", tmp_path / name) == 2
        assert "is not a reference saved by st-npu verify" in capsys.readouterr().err


@needs_emulator
def test_fp32_on_the_emulated_npu_passes(tiny_cls, tmp_path, capsys):
    assert verify_cli("--model", tiny_cls, "--device", "npu:1", "--json", tmp_path / "npu.json") == 0
    report = read_json(tmp_path / "npu.json")
    # The emulator computes on the CPU, so only the device differs from the reference.
    assert (report["device"], report["dtype"], report["reference"]["device"]) == ("npu:1", "float32", "cpu")
    assert report["mean_cosine"] > 1 - 1e-6 and report["max_abs_diff"] < 1e-5
    assert report["neighbours"]["agreement"] == 1.0 and report["versions"]["torch_npu"] == "emulated"
    assert "npu:1, float32" in capsys.readouterr().out


@needs_emulator
def test_library_verify_on_the_emulated_npu(tiny_cls):
    sentences = check.verify_texts()
    reference = check.cpu_reference(str(tiny_cls), sentences)
    report = check.verify(st_npu.SentenceTransformer(tiny_cls, device="npu:2"), reference, sentences)
    assert report["device"] == "npu:2" and report["passed"] and report["mean_cosine"] > 1 - 1e-6
