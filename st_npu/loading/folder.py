"""Reading a model folder: where it is (local or hub cache), what its files say, and whether they agree.

The result is a :class:`ModelPlan`. Every problem found is raised here, before stock's loader reads any weights,
with the file it concerns; what the files hold is left to stock to load. A folder without ``modules.json`` is
built only from a known-model spec in ``configs/models/``: the pooling of an unknown model is never guessed.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st_npu.errors import InvalidValueError
from st_npu.loading import data as _data
from st_npu.loading.data import CONFIG_DIR, load_config

DEFAULT_MODEL = "BAAI/llm-embedder"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files of other frameworks and exports that a torch model never reads.
HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.gguf", "coreml/*"]
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class ModelFolderError(ValueError):
    """A model folder is missing a file or its files are wrong; the message names the file."""


class NotAModelFolderError(NotADirectoryError):
    """A model path that is a file (stock raises ``NotADirectoryError`` or, before 6.0, an ``OSError``)."""


class ModelNotFoundError(FileNotFoundError):
    """Neither a local folder nor a model the hub (or its cache) can provide."""


@dataclass(frozen=True)
class ModuleEntry:
    """One line of ``modules.json``."""

    name: str
    path: str
    type: str


@dataclass(frozen=True)
class ModelPlan:
    """A checked folder: stock loads it from ``modules.json`` (``modules``), or, when ``modules`` is None, st_npu
    builds it from its known-model spec. ``prompts`` etc. are ``config_sentence_transformers.json``'s."""

    folder: Path
    hidden_size: int | None  # the transformer's, when the model has one
    modules: tuple[ModuleEntry, ...] | None
    spec: dict[str, Any] | None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None


def read_json(path: Path) -> Any:
    return _data.read_json(path, ModelFolderError)


def known_specs() -> list[dict[str, Any]]:
    return [load_config(f"models/{path.name}") for path in sorted((CONFIG_DIR / "models").glob("*.json"))]


def find_spec(*names: str | None, reranker: bool = False) -> dict[str, Any] | None:
    """The known-model spec whose name or alias matches one of ``names`` (ids, folder names), if any: an embedder's,
    or with ``reranker`` a reranker's (``"reranker": true`` in its spec)."""
    wanted = {name.strip().rstrip("/\\").lower() for name in names if name}
    wanted |= {Path(name).name for name in wanted}
    for spec in known_specs():
        if bool(spec.get("reranker")) == reranker and wanted & {alias.lower()
                                                               for alias in (spec["name"], *spec.get("aliases", ()))}:
            return spec
    return None


def recognise_spec(folder: Path, model_id: str | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """The known model a folder holds, from what its files and location say: the id it was asked for, the
    folder's name and those above it (the hub cache keeps ``models--BAAI--llm-embedder/snapshots/<hash>``),
    and the ``_name_or_path`` transformers records in ``config.json``."""
    parts = [part.removeprefix("models--") for part in folder.resolve().parts[-4:]]
    return find_spec(model_id, *parts, config.get("_name_or_path"))


def is_reranker(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds a cross-encoder, which ``st-npu verify`` and ``st-npu bench`` then check as a
    reranker: its ``config.json`` names a sequence-classification model, or a causal LM with no ``modules.json`` (as
    Qwen3-Reranker's; stock ``CrossEncoder`` scores it with ``LogitScore``, while Qwen3-Embedding's causal-LM config
    comes with its embedder's ``modules.json``)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    architectures = [str(name) for name in read_json(path).get("architectures") or []]
    causal_lm = any(name.endswith("ForCausalLM") for name in architectures)
    causal_lm = causal_lm and not (Path(folder) / "modules.json").exists()
    return causal_lm or any(name.endswith("ForSequenceClassification") for name in architectures)


def recognise_model(model: Any, *names: str | None, reranker: bool = False) -> dict[str, Any] | None:
    """The known model a loaded model is, from ``names`` (the id it was asked for) and where its transformer was
    loaded from (for models stock built)."""
    from st_npu import _compat

    source = _compat.name_or_path(model)
    parts = [part.removeprefix("models--") for part in Path(source).parts[-4:]] if source else []
    return find_spec(*names, source, *parts, reranker=reranker)


def resembled_spec(config: dict[str, Any], pooling_modes: list[str], normalize: bool) -> dict[str, Any] | None:
    """A known model whose architecture and pooling this folder has, though nothing names it."""
    for spec in known_specs():
        architecture = spec["architecture"]
        if (not spec.get("reranker") and config.get("model_type") == architecture["model_type"]
                and config.get("hidden_size") == architecture["hidden_size"]
                and config.get("num_hidden_layers") == architecture.get("num_hidden_layers")
                and pooling_modes == [spec["pooling_mode"]] and normalize == spec["normalize"]):
            return spec
    return None


_warned_folders: set[Path] = set()


def warn_unrecognised(folder: Path, spec: dict[str, Any]) -> None:
    """Once per folder: it looks like ``spec`` but nothing says so, so its instructions are not registered."""
    if folder.resolve() in _warned_folders:
        return
    _warned_folders.add(folder.resolve())
    warnings.warn(
        f"{folder} looks like {spec['name']} ({spec['description'].split(';')[0]}) but neither its name nor its "
        f"files say so, so its task instructions are not registered and encode_query() adds none. If it is "
        f"{spec['name']}, pass spec={spec['name']!r} (st-npu: --spec {spec['name']}).", UnrecognisedModelWarning,
        stacklevel=4)


class UnrecognisedModelWarning(UserWarning):
    """A folder resembles a known model that nothing in it names (see ``spec=``)."""


def spec_by_name(name: str) -> dict[str, Any]:
    spec = find_spec(name)
    if spec is None:
        known = ", ".join(s["name"] for s in known_specs())
        raise InvalidValueError(f"No known-model spec named {name!r}; known: {known}.")
    return spec


def resolve_model_path(
    name_or_path: str | os.PathLike,
    *,
    cache_folder: str | None = None,
    revision: str | None = None,
    token: bool | str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as is, or a hub id through huggingface_hub (its cache, ``HF_ENDPOINT`` and offline mode)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotAModelFolderError(f"{path} is a file, not a directory; expected a model folder or a hub id such as "
                                   f"{DEFAULT_MODEL}.")
    repo_id = str(name_or_path)
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise ModelNotFoundError(f"Model folder {path} does not exist (and {repo_id!r} is not a hub id like org/name).")

    from huggingface_hub import snapshot_download

    def download(ignore: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_folder,
                token=token,
                local_files_only=local_files_only,
                ignore_patterns=ignore,
            )
        )

    try:
        # Repos often hold the weights twice (safetensors and .bin); fetch the .bin only when it is the only copy.
        folder = download([*HUB_IGNORE, "*.bin"])
        if not any((folder / name).exists() for name in WEIGHT_FILES):
            folder = download(HUB_IGNORE)
    except Exception as exc:  # huggingface_hub raises many types: offline, not cached, 404, network
        raise ModelNotFoundError(_hub_failure(repo_id, exc, local_files_only, cache_folder)) from exc
    return folder


def _hub_failure(repo_id: str, exc: Exception, local_files_only: bool, cache_folder: str | None) -> str:
    """What went wrong fetching ``repo_id``, told apart: no such model, offline mode, or no network."""
    from huggingface_hub import constants, errors

    cache = cache_folder or constants.HF_HUB_CACHE
    close = difflib.get_close_matches(repo_id, [spec["name"] for spec in known_specs()], n=1)
    did_you_mean = f" Did you mean {close[0]!r}?" if close and close[0] != repo_id else ""
    local = f"pass a local folder instead (e.g. one made by `hf download {repo_id} --local-dir DIR`)"
    if isinstance(exc, errors.GatedRepoError):
        reason = f"{repo_id!r} is gated: accept its terms on the hub and log in with `hf auth login`."
    elif isinstance(exc, errors.RepositoryNotFoundError):
        reason = f"the hub has no model {repo_id!r} (or it is private: log in with `hf auth login`).{did_you_mean}"
    elif local_files_only or constants.HF_HUB_OFFLINE:
        switch = "local_files_only=True" if local_files_only else "offline mode (HF_HUB_OFFLINE is set)"
        reason = (f"{repo_id!r} is not in the cache ({cache}) and {switch} forbids downloading it.{did_you_mean} "
                  f"Download it where there is network, or {local}.")
    elif isinstance(exc, errors.LocalEntryNotFoundError):
        endpoint = constants.ENDPOINT
        reason = (f"the hub ({endpoint}) could not be reached ({_first_line(exc.__cause__ or exc)}) and "
                  f"{repo_id!r} is not in the cache ({cache}).{did_you_mean} Check the network, set HF_ENDPOINT "
                  f"to a mirror you can reach (e.g. https://hf-mirror.com), or {local}.")
    else:
        reason = f"fetching it failed: {type(exc).__name__}: {_first_line(exc)}.{did_you_mean}"
    return f"Model {repo_id!r} is not a local folder, and {reason}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_model_folder(folder: Path, spec: dict[str, Any] | None = None, model_id: str | None = None) -> ModelPlan:
    """Check a folder's files and describe the modules to build.

    ``spec`` forces a known-model spec; otherwise one is recognised from ``model_id``, the folder's path and its
    ``config.json`` (:func:`recognise_spec`), and used for its instructions (and, when there is no
    ``modules.json``, for the whole pipeline). A folder that looks like a known model nothing names gets one
    :class:`UnrecognisedModelWarning`.
    """
    st_config = _read_optional(folder / "config_sentence_transformers.json")
    modules_file = folder / "modules.json"
    if modules_file.exists():
        modules = _read_modules(modules_file)
        config, pooling_modes = _check_modules(folder, modules)
        spec = spec or (recognise_spec(folder, model_id, config) if config else None)
        if spec is None and config:
            look_alike = resembled_spec(config, pooling_modes, any(_kind(entry) == "Normalize" for entry in modules))
            if look_alike is not None and look_alike.get("instructions"):
                warn_unrecognised(folder, look_alike)
    else:
        modules = None
        config = _check_transformer_folder(folder)
        spec = spec or recognise_spec(folder, model_id, config)
        if spec is None:
            raise ModelFolderError(
                f"{modules_file} is missing, so the pooling of this model cannot be inferred (st_npu never guesses "
                f"mean pooling). Add modules.json and 1_Pooling/config.json, or pass spec=<name> (st-npu: --spec) "
                f"for a known model ({', '.join(s['name'] for s in known_specs())})."
            )
        if config["hidden_size"] != spec["architecture"]["hidden_size"]:
            raise ModelFolderError(
                f"{folder / 'config.json'} has hidden_size {config['hidden_size']}, but {spec['name']} has "
                f"{spec['architecture']['hidden_size']}: this folder is not {spec['name']}."
            )
    return ModelPlan(
        folder=folder,
        hidden_size=config.get("hidden_size"),
        modules=modules,
        spec=spec,
        prompts=st_config.get("prompts") or {},
        default_prompt_name=st_config.get("default_prompt_name"),
        similarity_fn_name=st_config.get("similarity_fn_name"),
    )


def _read_optional(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    content = read_json(path)
    if not isinstance(content, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, found {type(content).__name__}.")
    return content


def _read_modules(path: Path) -> tuple[ModuleEntry, ...]:
    content = read_json(path)
    if not isinstance(content, list) or not content:
        raise ModelFolderError(f"{path} must be a non-empty JSON list of modules.")
    entries = []
    for position, item in enumerate(content):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not isinstance(item.get("path", ""), str):
            raise ModelFolderError(f"{path}: entry {position} needs a string 'type' and 'path', found {item!r}.")
        entries.append(ModuleEntry(name=str(item.get("name", position)), path=item.get("path", ""), type=item["type"]))
        if item.get("path") and not (path.parent / item["path"]).is_dir() and not item["type"].endswith("Normalize"):
            raise ModelFolderError(f"{path}: entry {position} ({item['type']}) points at missing folder {item['path']!r}.")
    return tuple(entries)


def _kind(entry: ModuleEntry) -> str:
    return entry.type.rsplit(".", 1)[-1]


def _check_modules(folder: Path, modules: tuple[ModuleEntry, ...]) -> tuple[dict[str, Any], list[str]]:
    """Check the files of the modules st_npu knows: a Transformer's folder, and each Pooling's configuration
    against the transformer before it. Returns that transformer's config.json ({} for a model without one:
    StaticEmbedding, WordEmbeddings, Router or custom code, whose files stock's loader checks) and the
    pooling modes."""
    config: dict[str, Any] = {}
    modes: list[str] = []
    for entry in modules:
        if _kind(entry) == "Transformer":
            config = _check_transformer_folder(folder / entry.path)
        elif _kind(entry) == "Pooling" and config:
            modes += _check_pooling(folder / entry.path / "config.json", config["hidden_size"])
    return config, modes


def _read_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").exists():
        raise ModelFolderError(f"{folder / 'config.json'} is missing: the transformer's configuration is required.")
    return _read_optional(folder / "config.json")


def _check_transformer_folder(folder: Path) -> dict[str, Any]:
    """config.json, tokenizer and weights are present and sane; returns config.json with ``hidden_size`` set."""
    config = _read_config(folder)
    hidden_size = config.get("hidden_size", config.get("d_model", config.get("dim")))
    if not isinstance(hidden_size, int):
        raise ModelFolderError(f"{folder / 'config.json'} has no integer hidden_size.")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ModelFolderError(f"{folder} has no tokenizer files: expected tokenizer.json or vocab.txt.")
    if not any((folder / name).exists() for name in WEIGHT_FILES):
        raise ModelFolderError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}.")
    st_config = _read_optional(folder / "sentence_bert_config.json")
    max_seq_length = st_config.get("max_seq_length")
    max_positions = config.get("max_position_embeddings")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ModelFolderError(f"{folder / 'sentence_bert_config.json'}: max_seq_length {max_seq_length!r} is not a positive integer.")
    if max_seq_length and isinstance(max_positions, int) and max_seq_length > max_positions:
        raise ModelFolderError(
            f"{folder / 'sentence_bert_config.json'}: max_seq_length {max_seq_length} exceeds the model's "
            f"max_position_embeddings {max_positions} in config.json."
        )
    return {**config, "hidden_size": hidden_size}


def _check_pooling(path: Path, hidden_size: int) -> list[str]:
    config = _read_optional(path) if path.exists() else None
    if config is None:
        raise ModelFolderError(f"{path} is missing: the pooling configuration is required.")
    dimension = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if dimension != hidden_size:
        raise ModelFolderError(
            f"{path}: the pooling dimension {dimension!r} disagrees with hidden_size {hidden_size} in config.json."
        )
    modes = config.get("pooling_mode") or [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)]
    if not modes:
        raise ModelFolderError(f"{path} enables no pooling mode; st_npu will not fall back to mean pooling.")
    return [modes] if isinstance(modes, str) else list(modes)
