"""What makes a model (or an input) this one wherever its files lie: the sha256 of the files that decide it.

``st-npu verify`` records a model's identity in a saved reference and the corpus job in its manifest, so both
refuse to mix results of different models. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# Files that decide a model's embeddings besides its weights: configurations, vocabularies, sentencepiece models.
SETTING_SUFFIXES = (".json", ".txt", ".model")
# Exports for other runtimes never change what torch computes; hidden folders hold download bookkeeping.
IGNORED_FOLDERS = ("onnx", "openvino", "coreml")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files that decide a folder's embeddings: settings and vocabularies, and the weights torch loads.

    Only safetensors are counted when a folder also has ``.bin`` copies, because transformers loads those, so
    a reference survives downloading one format on one machine and both on another.
    """
    files = [path for path in sorted(folder.rglob("*")) if path.is_file() and not _ignored(path.relative_to(folder))]
    weights = [path for path in files if path.suffix == ".safetensors"] or [p for p in files if p.suffix == ".bin"]
    return [path for path in files if path.suffix in SETTING_SUFFIXES] + weights


def _ignored(relative: Path) -> bool:
    return any(part.startswith(".") or part in IGNORED_FOLDERS for part in relative.parts)


def model_identity(folder: Path, spec: dict[str, Any] | None) -> dict[str, Any]:
    """What makes a model this model wherever its folder lies: its spec name and the sha256 of its files."""
    return {"spec": spec["name"] if spec else None,
            "files": {path.relative_to(folder).as_posix(): sha256_file(path) for path in model_files(folder)}}


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two model identities, in words; empty when they are the same model."""
    differences = []
    if saved["spec"] != current["spec"]:
        differences.append(f"known-model spec {saved['spec'] or 'none'} vs {current['spec'] or 'none'}")
    before, now = saved["files"], current["files"]
    changed = sorted(name for name in before.keys() & now.keys() if before[name] != now[name])
    for label, names in (("different content", changed), ("only in the reference's model", sorted(before.keys() - now)),
                         ("only in this model", sorted(now.keys() - before))):
        if names:
            differences.append(f"{label}: {', '.join(names)}")
    return differences
