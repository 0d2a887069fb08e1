"""What one server serves: its models, each with a name, a kind, devices and its own batch limits.

A model comes from a ``--model`` option (``name=path[,devices=npu:0,npu:1][,dtype=...]``, given once per model) or
from a table of a TOML deployment file. Its kind is read from its folder, as ``st-npu verify`` reads it: a
sequence-classification model is a reranker (``CrossEncoder``), a folder that sentence-transformers saved as a
``SparseEncoder`` is a sparse (SPLADE) model, anything else an embedder. Nothing here loads a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from st_npu.errors import UsageError
from st_npu.loading.folder import is_reranker, read_json, resolve_model_path

KINDS = ("embed", "rerank", "sparse")
# A name is a URL path piece (the model's TEI routes are /models/{name}/...), slashes allowed as in hub ids.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*")
OPTION_KEYS = ("devices", "dtype", "spec", "kind", "max_batch_tokens", "max_batch_size")


@dataclass(frozen=True)
class ModelEntry:
    """One served model. ``devices``: one copy of the model each (empty: the server's default device);
    ``max_batch_tokens`` and ``max_batch_size``: this model's batch limits (None: the server's)."""

    name: str
    path: str
    kind: str | None = None  # None until detected from the folder
    devices: tuple[str | None, ...] = (None,)
    dtype: str | None = None
    spec: str | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    routed: bool = True  # has its own /models/{name}/ routes (a name that is a path, from the old flags, has none)

    def option(self) -> str:
        """The entry as one ``--model`` value (what ``bench-serve`` gives the servers it starts)."""
        pieces = [f"{self.name}={self.path}"]
        if self.devices != (None,):
            pieces.append("devices=" + ",".join(str(device) for device in self.devices))
        for key in ("kind", "dtype", "spec", "max_batch_tokens", "max_batch_size"):
            if getattr(self, key) is not None:
                pieces.append(f"{key}={getattr(self, key)}")
        return ",".join(pieces)


def is_named(text: str) -> bool:
    """Whether a ``--model`` value is ``name=path,...`` rather than a bare folder or hub id."""
    head = text.split(",", 1)[0]
    return "=" in head and NAME.fullmatch(head.split("=", 1)[0]) is not None


def parse_model_option(text: str) -> ModelEntry:
    """``name=path[,devices=npu:0,npu:1][,dtype=...][,spec=...][,kind=...][,max_batch_tokens=N]``.

    Devices are separated by commas like the options, so a piece without ``=`` after ``devices=`` is one more
    device."""
    pieces = [piece.strip() for piece in text.split(",")]
    name, _, path = pieces[0].partition("=")
    options: dict[str, Any] = {}
    last = None
    for piece in pieces[1:]:
        key, equals, value = piece.partition("=")
        if not equals and last == "devices":
            options["devices"].append(key)
            continue
        key = key.replace("-", "_")
        if not equals or key not in OPTION_KEYS:
            raise UsageError(f"--model {text}: {piece!r} is not one of {', '.join(k + '=...' for k in OPTION_KEYS)}")
        options[key] = [value] if key == "devices" else value
        last = key
    return _entry(name, path, options, f"--model {text}")


def read_deployment(path: str | Path) -> list[ModelEntry]:
    """The ``[[models]]`` tables of a TOML file: ``name``, ``path``, and the ``--model`` options as keys."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError('--deployment needs Python 3.11 or tomli: pip install "st-npu[serve]"') from None
    source = Path(path)
    try:
        content = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--deployment {source}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--deployment {source}: not valid TOML: {exc}") from None
    tables = content.get("models")
    if not isinstance(tables, list) or not tables or not all(isinstance(table, dict) for table in tables):
        raise UsageError(f"--deployment {source}: expected one [[models]] table per model, with name and path")
    unknown = sorted(set(content) - {"models"})
    if unknown:
        raise UsageError(f"--deployment {source}: unknown top-level keys {unknown}; only [[models]] tables go here")
    entries = []
    for index, table in enumerate(tables):
        where = f"--deployment {source}: models[{index}]"
        table = {key.replace("-", "_"): value for key, value in table.items()}
        extra = sorted(set(table) - {"name", "path", *OPTION_KEYS})
        if extra:
            raise UsageError(f"{where}: unknown keys {extra}; known: name, path, {', '.join(OPTION_KEYS)}")
        if not isinstance(table.get("name"), str) or not isinstance(table.get("path"), str):
            raise UsageError(f"{where}: needs name and path, both strings")
        devices = table.get("devices")
        if isinstance(devices, str):
            table["devices"] = devices.split(",")
        entries.append(_entry(table.pop("name"), table.pop("path"), table, where))
    return entries


def _entry(name: str, path: str, options: dict[str, Any], where: str) -> ModelEntry:
    if not NAME.fullmatch(name):
        raise UsageError(f"{where}: the name {name!r} must be letters, digits, '.', '_', '-' (and '/' between them)")
    if not path:
        raise UsageError(f"{where}: no folder or hub id after {name}=")
    devices = options.get("devices")
    if devices is not None:
        if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d.strip() for d in devices):
            raise UsageError(f"{where}: devices must be device names, e.g. devices=npu:0,npu:1")
        devices = [device.strip() for device in devices]
        if len(set(devices)) != len(devices):
            raise UsageError(f"{where}: devices names a device twice: {','.join(devices)}")
    kind = options.get("kind")
    if kind is not None and kind not in KINDS:
        raise UsageError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    limits = {}
    for key in ("max_batch_tokens", "max_batch_size"):
        value = options.get(key)
        if value is not None:
            try:
                limits[key] = int(value)
            except (TypeError, ValueError):
                limits[key] = 0
            if limits[key] < 1 or isinstance(value, bool):
                raise UsageError(f"{where}: {key} must be a positive integer, got {value!r}")
    for key in ("dtype", "spec"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise UsageError(f"{where}: {key} must be a string, got {options[key]!r}")
    return ModelEntry(name, path, kind, tuple(devices) if devices else (None,), options.get("dtype"),
                      options.get("spec"), **limits)


def check_names(entries: list[ModelEntry]) -> None:
    names = [entry.name for entry in entries]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"each model needs its own name; given more than once: {', '.join(twice)}")


def detect_kind(entry: ModelEntry) -> ModelEntry:
    """The entry with its kind read from its folder (unless given)."""
    if entry.kind is not None:
        return entry
    folder = resolve_model_path(entry.path)
    return replace(entry, kind=folder_kind(folder))


def folder_kind(folder: str | Path) -> str:
    if is_reranker(folder):
        return "rerank"
    return "sparse" if is_sparse_encoder(folder) else "embed"


def is_sparse_encoder(folder: str | Path) -> bool:
    """Whether sentence-transformers saved this folder as a ``SparseEncoder``: its config says so (5.0 and later
    write ``model_type``), or its modules are sparse-encoder modules."""
    folder = Path(folder)
    config = folder / "config_sentence_transformers.json"
    if config.is_file() and read_json(config).get("model_type") == "SparseEncoder":
        return True
    modules = folder / "modules.json"
    return modules.is_file() and any(".sparse_encoder." in str(module.get("type", ""))
                                     for module in read_json(modules) if isinstance(module, dict))
