"""``st-npu verify``: do a device and dtype give the CPU float32 embeddings, within a threshold?

The original port's accuracy check, made repeatable: the 23 built-in sentences (plus a user's file) are encoded
on the target and on the CPU in float32, then compared by per-text cosine, the Pearson correlation of the two
cosine-similarity matrices and each text's top-5 nearest neighbours. It passes when the error rate,
(1 - mean cosine) x 100, is under the threshold (percent) and the Pearson correlation is at least 0.99.

The math lives in small pure functions on numpy arrays; :func:`verify` is the library entry point, and
:func:`check_model` / :func:`make_reference` are what ``st-npu verify`` runs (its command module turns options into
their parameters). A CPU reference can be saved on one machine (``--save-reference``) and used on another
(``--reference``): an ``.npz`` archive without pickles holding the embeddings and JSON metadata that
identifies the model by the content of its files and the texts by their hash, so neither can silently differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from st_npu.errors import InvalidValueError, NonFiniteError
from st_npu.evaluation.workloads import seed_sentences
from st_npu.files.inputs import read_texts
from st_npu.files.outputs import atomic_file
from st_npu.loading.fingerprint import identity_differences, model_identity
from st_npu.loading.folder import resolve_model_path
from st_npu.runtime.doctor import installed_version

MIN_PEARSON = 0.99
NEIGHBOURS = 5
BATCH_SIZE = 32
REFERENCE_FORMAT = "st-npu-verify-reference/1"
REFERENCE_KEYS = {"model", "identity", "texts_sha256", "count", "texts_file", "dimension", "device", "dtype",
                  "versions"}
SHOWN_DIFFERENCES = 5


# --- the math: pure functions on arrays -------------------------------------------------------------------


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    rows = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)


def cosines(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``target`` with the same row of ``reference``, in float64.

    Clipped to [-1, 1]: rounding can put the cosine of two equal vectors a hair above 1, which would show as a
    negative error rate.
    """
    return np.clip(np.sum(_unit_rows(reference) * _unit_rows(target), axis=1), -1.0, 1.0)


def similarity_matrix(embeddings: np.ndarray) -> np.ndarray:
    """The n x n cosine similarities of the rows."""
    unit = _unit_rows(embeddings)
    return unit @ unit.T


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """The entries above the diagonal: each pair once, without the self-similarities that are 1 on both sides."""
    rows, columns = np.triu_indices(len(matrix), k=1)
    return matrix[rows, columns]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equally long vectors; nan when either is constant, where it is undefined."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"pearson needs two vectors of the same length >= 2, got {x.size} and {y.size} values")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else math.nan


def top_neighbours(similarity: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` most similar other rows, most similar first (ties keep the lower index first)."""
    scores = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def neighbour_differences(reference_top: np.ndarray, target_top: np.ndarray) -> list[int]:
    """Indices of the rows whose neighbour sets (from :func:`top_neighbours`) differ; the order within is ignored."""
    return [row for row in range(len(reference_top)) if set(reference_top[row]) != set(target_top[row])]


def error_rate_percent(mean_cosine: float) -> float:
    return (1.0 - mean_cosine) * 100.0


def check_threshold(threshold: float) -> None:
    if not (math.isfinite(threshold) and threshold >= 0):
        raise InvalidValueError(f"threshold {threshold} % is not a valid error rate: use a number >= 0, e.g. 1.0")


def failures(error_rate: float, pearson_value: float, threshold: float, min_pearson: float = MIN_PEARSON) -> list[str]:
    """Why the check fails; empty when it passes.

    The error rate must be strictly under the threshold, so ``--threshold 0`` never passes, not even for a
    target that is the reference itself. An undefined (nan) Pearson fails.
    """
    reasons = []
    if not error_rate < threshold:
        reasons.append(f"error rate {error_rate:.6f} % is not under {threshold:g} %")
    if not pearson_value >= min_pearson:
        reasons.append(f"similarity Pearson {pearson_value:.6f} is below {min_pearson:g}")
    return reasons


def compare(reference: np.ndarray, target: np.ndarray, texts: Sequence[str], threshold: float = 1.0) -> dict[str, Any]:
    """Every figure of the check for ``target`` against ``reference`` (rows are ``texts``, in order), as plain data."""
    reference, target = np.asarray(reference), np.asarray(target)
    if reference.shape != target.shape or reference.ndim != 2 or len(texts) != len(reference):
        raise ValueError(f"cannot compare embeddings of shape {reference.shape} (reference) with {target.shape} "
                         f"(target) for {len(texts)} texts")
    check_threshold(threshold)
    per_text = cosines(reference, target)
    worst = int(np.argmin(per_text))
    mean = float(per_text.mean())
    expected, got = similarity_matrix(reference), similarity_matrix(target)
    correlation = pearson(upper_triangle(expected), upper_triangle(got))
    k = min(NEIGHBOURS, len(texts) - 1)
    expected_top, got_top = top_neighbours(expected, k), top_neighbours(got, k)
    differing = neighbour_differences(expected_top, got_top)
    reasons = failures(error_rate_percent(mean), correlation, threshold)
    non_finite = np.flatnonzero(~np.isfinite(target).all(axis=1)).tolist()
    if non_finite:
        reasons.insert(0, f"{len(non_finite)} of {len(texts)} rows are NaN or infinite (texts "
                          f"{', '.join(map(str, non_finite[:10]))}): a float16 overflow, mostly; use bfloat16 or float32")
    return {
        "count": len(texts),
        "dimension": int(reference.shape[1]),
        "mean_cosine": mean,
        "min_cosine": float(per_text[worst]),
        "worst": {"index": worst, "text": texts[worst], "cosine": float(per_text[worst])},
        "max_abs_diff": float(np.abs(target.astype(np.float64) - reference.astype(np.float64)).max()),
        "pearson": correlation if math.isfinite(correlation) else None,  # JSON has no nan
        "error_rate_percent": error_rate_percent(mean),
        "threshold_percent": threshold,
        "min_pearson": MIN_PEARSON,
        "neighbours": {
            "k": k,
            "agreement": 1.0 - len(differing) / len(texts),
            "differing": [{"index": row, "text": texts[row], "reference": expected_top[row].tolist(),
                           "target": got_top[row].tolist()} for row in differing],
        },
        "cosines": per_text.tolist(),
        "non_finite_rows": non_finite,
        "failures": reasons,
        "passed": not reasons,
    }


# --- models, texts and versions ---------------------------------------------------------------------------


def verify_texts(extra_file: str | None = None) -> list[str]:
    """The built-in 23 sentences, then the lines of ``extra_file``."""
    return seed_sentences() + (read_texts(extra_file) if extra_file else [])


def encode(model: Any, texts: Sequence[str]) -> np.ndarray:
    """The rows of ``texts``; where the model gives NaN or inf (st_npu raises then), those rows are NaN, found by
    encoding each text alone, so the comparison reports them as a failure."""
    try:
        return np.asarray(model.encode(list(texts), batch_size=BATCH_SIZE, convert_to_numpy=True), dtype=np.float32)
    except NonFiniteError:
        rows = []
        for text in texts:
            try:
                rows.append(np.asarray(model.encode([text], convert_to_numpy=True), dtype=np.float32)[0])
            except NonFiniteError:
                rows.append(None)
        width = next(len(row) for row in rows if row is not None) if any(r is not None for r in rows) else 1
        return np.stack([row if row is not None else np.full(width, np.nan, np.float32) for row in rows])


def describe(model: Any) -> dict[str, str]:
    """The device and dtype the model computes in, e.g. ``npu:0`` and ``bfloat16``."""
    return {"device": str(model.device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def versions() -> dict[str, str | None]:
    torch_npu = sys.modules.get("torch_npu")  # the emulator's stand-in has no distribution, only a module
    return {
        "torch": installed_version("torch"),
        "torch_npu": getattr(torch_npu, "__version__", None) or installed_version("torch-npu"),
        "sentence_transformers": installed_version("sentence-transformers"),
        "transformers": installed_version("transformers"),
        "st_npu": installed_version("st-npu"),
    }


def load(model_name_or_path: str, device: str | None, dtype: str | None, spec: str | None = None) -> Any:
    from st_npu import SentenceTransformer  # on first use: a torch_npu that cannot load is then explained

    return SentenceTransformer(model_name_or_path, device=device, dtype=dtype, spec=spec)


def cpu_model(model_name_or_path: str, spec: str | None = None) -> Any:
    """The reference setup: a separate instance of the model on the CPU in float32."""
    return load(model_name_or_path, "cpu", "float32", spec)


def cpu_reference(model_name_or_path: str, texts: Sequence[str], spec: str | None = None) -> np.ndarray:
    """The reference embeddings of ``texts``."""
    return encode(cpu_model(model_name_or_path, spec), texts)


def verify(model: Any, reference_embeddings: np.ndarray, texts: Sequence[str],
           threshold: float = 1.0) -> dict[str, Any]:
    """Encode ``texts`` with ``model`` and compare with ``reference_embeddings`` (e.g. from :func:`cpu_reference`).

    Returns the report: ``mean_cosine``, ``min_cosine``, ``pearson``, ``error_rate_percent``, ``passed`` and the
    rest of :func:`compare`, with the model's ``device`` and ``dtype``.
    """
    return {**describe(model), **compare(reference_embeddings, encode(model, texts), texts, threshold)}


# --- saved references -------------------------------------------------------------------------------------


def texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def reference_metadata(model: str, identity: dict[str, Any], texts: Sequence[str], texts_file: str | None,
                       embeddings: np.ndarray) -> dict[str, Any]:
    return {"format": REFERENCE_FORMAT, "model": model, "identity": identity, "texts_sha256": texts_sha256(texts),
            "count": len(texts), "texts_file": texts_file, "dimension": int(embeddings.shape[1]), "device": "cpu",
            "dtype": "float32", "versions": versions()}


def save_reference(path: Path, embeddings: np.ndarray, metadata: dict[str, Any]) -> None:
    """One ``.npz`` file under exactly ``path`` (np.savez given a name would append ``.npz``), no pickles."""
    with atomic_file(path) as handle:
        np.savez(handle, embeddings=np.asarray(embeddings, dtype=np.float32), metadata=np.array(json.dumps(metadata)))


def load_reference(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The embeddings and metadata of a saved reference; anything else is refused with a ValueError (that is also a
    :class:`UsageError`) naming the file."""
    not_reference = f"{path} is not a reference saved by st-npu verify --save-reference"
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise InvalidValueError(f"--reference {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidValueError(f"{not_reference} ({exc})") from None
    if not hasattr(archive, "files") or {"embeddings", "metadata"} - set(archive.files):
        raise InvalidValueError(f"{not_reference} (it lacks the embeddings and metadata arrays)")
    with archive:
        embeddings, metadata_text = archive["embeddings"], str(archive["metadata"])
    try:
        metadata = json.loads(metadata_text)
    except json.JSONDecodeError as exc:
        raise InvalidValueError(f"{not_reference} (its metadata is not JSON: {exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != REFERENCE_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise InvalidValueError(f"{not_reference} (format {found!r}, expected {REFERENCE_FORMAT!r})")
    if REFERENCE_KEYS - metadata.keys():
        missing = ", ".join(sorted(REFERENCE_KEYS - metadata.keys()))
        raise InvalidValueError(f"{path} is damaged: its metadata lacks {missing}")
    if embeddings.shape != (metadata["count"], metadata["dimension"]):
        raise InvalidValueError(f"{path} is damaged: its embeddings have shape {embeddings.shape}, its metadata "
                                f"says {metadata['count']} x {metadata['dimension']}")
    return embeddings, metadata


def check_same_texts(metadata: dict[str, Any], texts: Sequence[str], texts_file: str | None, path: str) -> None:
    if metadata["texts_sha256"] == texts_sha256(texts):
        return
    raise InvalidValueError(
        f"--reference {path} holds other texts: {metadata['count']} texts "
        f"({_texts_source(metadata['texts_file'])}, sha256 {metadata['texts_sha256'][:12]}), this run has "
        f"{len(texts)} ({_texts_source(texts_file)}, sha256 {texts_sha256(texts)[:12]}). Pass the same --texts "
        f"file as when the reference was saved."
    )


def check_same_model(metadata: dict[str, Any], identity: dict[str, Any], path: str) -> None:
    differences = identity_differences(metadata["identity"], identity)
    if differences:
        raise InvalidValueError(f"--reference {path} was saved from another model ({metadata['model']}): "
                                f"{'; '.join(differences)}. Save a reference of this model with --save-reference.")


def _texts_source(texts_file: str | None) -> str:
    return f"the built-in 23 and {texts_file}" if texts_file else "the built-in 23"


# --- what st-npu verify runs -------------------------------------------------------------------------------


def check_model(model_name_or_path: str, texts: Sequence[str], *, device: str | None, dtype: str | None,
                spec: str | None = None, threshold: float = 1.0, reference_path: str | None = None,
                texts_file: str | None = None) -> dict[str, Any]:
    """The full report for the model on ``device`` in ``dtype`` against the CPU float32 reference: computed now,
    or loaded from ``reference_path`` (refused where its texts or model differ)."""
    check_threshold(threshold)
    if reference_path:
        reference, metadata = load_reference(reference_path)
        check_same_texts(metadata, texts, texts_file, reference_path)
        model = load(model_name_or_path, device, dtype, spec)
        check_same_model(metadata, model_identity(resolve_model_path(model_name_or_path), model.model_spec),
                         reference_path)
        source = {"source": reference_path, **{key: metadata[key] for key in ("device", "dtype", "versions")}}
    else:
        model = load(model_name_or_path, device, dtype, spec)  # first, so a bad device fails before the reference
        reference = cpu_reference(model_name_or_path, texts, spec)
        source = {"source": "computed", "device": "cpu", "dtype": "float32"}
    return {"model": model_name_or_path, **verify(model, reference, texts, threshold), "reference": source,
            "texts_file": texts_file, "versions": versions()}


def make_reference(model_name_or_path: str, texts: Sequence[str], path: Path, *, spec: str | None = None,
                   texts_file: str | None = None) -> dict[str, Any]:
    """Compute the CPU float32 reference of ``texts``, save it to ``path`` and return its metadata."""
    model = cpu_model(model_name_or_path, spec)
    embeddings = encode(model, texts)
    identity = model_identity(resolve_model_path(model_name_or_path), model.model_spec)
    metadata = reference_metadata(model_name_or_path, identity, texts, texts_file, embeddings)
    save_reference(path, embeddings, metadata)
    return metadata


def format_saved(metadata: dict[str, Any], path: str) -> str:
    """What ``--save-reference`` prints: what was saved and the command that uses it."""
    texts_option = f" --texts {metadata['texts_file']}" if metadata["texts_file"] else ""
    return "\n".join([
        f"saved the CPU float32 reference of {metadata['model']} to {path}",
        f"  texts     {metadata['count']} ({_texts_source(metadata['texts_file'])}), dimension {metadata['dimension']}",
        f"  model     {len(metadata['identity']['files'])} files hashed, spec {metadata['identity']['spec'] or 'none'}",
        f"  use it    st-npu verify --model {metadata['model']} --device npu{texts_option} --reference {path}",
    ])


def _preview(text: str, width: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table for a terminal."""
    reference, neighbours, worst = report["reference"], report["neighbours"], report["worst"]
    origin = "computed now" if reference["source"] == "computed" else f"loaded from {reference['source']}"
    agreeing = f"{report['count'] - len(neighbours['differing'])}/{report['count']}"
    pearson_value = "undefined" if report["pearson"] is None else f"{report['pearson']:.6f}"
    error_ok = report["error_rate_percent"] < report["threshold_percent"]
    pearson_ok = report["pearson"] is not None and report["pearson"] >= report["min_pearson"]
    rows = [
        ("check", "value", "limit"),
        ("error rate", f"{report['error_rate_percent']:.6f} %", f"< {report['threshold_percent']:g} %",
         "ok" if error_ok else "FAIL"),
        ("similarity Pearson", pearson_value, f">= {report['min_pearson']:g}", "ok" if pearson_ok else "FAIL"),
        ("mean cosine", f"{report['mean_cosine']:.6f}"),
        ("min cosine", f"{report['min_cosine']:.6f}", f"text {worst['index']} {_preview(worst['text'])}"),
        ("max abs difference", f"{report['max_abs_diff']:.3e}"),
        (f"top-{neighbours['k']} neighbours agree", agreeing, f"{neighbours['agreement']:.1%}"),
    ]
    lines = [
        f"st-npu verify: {report['model']}",
        f"  target      {report['device']}, {report['dtype']}",
        f"  reference   {reference['device']}, {reference['dtype']} ({origin})",
        f"  texts       {report['count']} ({_texts_source(report['texts_file'])}), dimension {report['dimension']}",
        "",
        *("  " + "".join(f"{cell:<{width}}" for cell, width in zip(row, (26, 16, 12, 4))).rstrip() for row in rows),
    ]
    for item in neighbours["differing"][:SHOWN_DIFFERENCES]:
        lines.append(f"    text {item['index']} {_preview(item['text'], 30)}: reference {item['reference']}, "
                     f"target {item['target']}")
    if len(neighbours["differing"]) > SHOWN_DIFFERENCES:
        lines.append(f"    ... and {len(neighbours['differing']) - SHOWN_DIFFERENCES} more (all in the --json report)")
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    installed = ", ".join(f"{name} {version}" for name, version in report["versions"].items() if version)
    if reference["source"] == "computed" and (report["device"], report["dtype"]) == ("cpu", "float32"):
        lines += ["", "  note: the target is the reference's own setup (cpu, float32); check an NPU with --device npu"]
    lines += ["", f"  {verdict}", f"  versions    {installed}"]
    return "\n".join(lines)
