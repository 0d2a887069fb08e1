"""``_manifest.json`` of a corpus output folder: what was embedded with what, and which shards are done.

A rerun compares its settings and input with the manifest's: the same ones resume (finished shards whose
checksums hold are skipped), different ones are refused with what differs, unless the caller starts over. The
batch size may change (it does not change the vectors). The leading ``_`` makes Parquet readers (pyarrow,
pandas, polars, Spark) skip the file when they read the folder as one dataset.
"""

from __future__ import annotations

import json
from typing import Any

from st_npu.corpus import storage
from st_npu.corpus.storage import Location
from st_npu.errors import InvalidValueError
from st_npu.loading.fingerprint import identity_differences

FORMAT = "st-npu-corpus/2"
NAME = "_manifest.json"
# Settings that do not change the output, so a resumed job may use other values.
MAY_CHANGE = ("model", "batch_size")


def load(folder: Location) -> dict[str, Any] | None:
    path = folder.child(NAME)
    if not storage.is_file(path):
        return None
    try:
        manifest = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidValueError(f"{path} is damaged ({exc}); rerun with --overwrite to start over") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidValueError(f"{path} was not written by st-npu embed-corpus ({FORMAT}); use another --output folder")
    return manifest


def save(folder: Location, manifest: dict[str, Any]) -> None:
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    storage.write_bytes(folder.child(NAME), json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8") + b"\n")


def differences(saved: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """What differs between a manifest's job and this one, in words; empty when they may share an output folder."""
    found = [f"model files: {item}" for item in identity_differences(saved["model_identity"], job["model_identity"])]
    for key, value in job["settings"].items():
        if key not in MAY_CHANGE and saved["settings"].get(key) != value:
            found.append(f"{key}: {saved['settings'].get(key)!r} there, {value!r} now")
    before = {entry["path"]: entry["sha256"] for entry in saved["input"]}
    now = {entry["path"]: entry["sha256"] for entry in job["input"]}
    if before != now:
        changed = sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
        found.append(f"input files: {', '.join(changed)} differ")
    return found
