"""Building the module pipeline (Transformer -> Pooling -> Normalize ...) from a checked :class:`ModelPlan`.

Saved modules are loaded by sentence-transformers' own ``Module.load`` so that their configuration is read
exactly as stock reads it; only a folder without ``modules.json`` is assembled from its known-model spec.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from st_npu import _compat
from st_npu.loading.folder import ModelPlan


def build_modules(plan: ModelPlan, **load_kwargs: Any) -> list[nn.Module]:
    """The modules in order. ``load_kwargs`` (model_kwargs, processor_kwargs, cache_folder, ...) go to loaders."""
    folder = str(plan.folder)
    if plan.modules is None:
        spec = plan.spec
        modules = [
            _compat.new_transformer(folder, spec["max_seq_length"], spec["do_lower_case"], load_kwargs.get("model_kwargs")),
            _compat.new_pooling(plan.hidden_size, spec["pooling_mode"]),
        ]
        return modules + ([_compat.Normalize()] if spec["normalize"] else [])
    return [_compat.load_module(_compat.module_class(entry.type), folder, entry.path, **load_kwargs) for entry in plan.modules]


def instruction_prompts(spec: dict[str, Any] | None) -> dict[str, str]:
    """A spec's task instructions as named prompts: ``{task}_query`` / ``{task}_key``, plus ``query`` /
    ``document`` for the default task, which ``encode_query`` and ``encode_document`` pick up."""
    if not spec or not spec.get("instructions"):
        return {}
    prompts = {}
    for task, pair in spec["instructions"].items():
        prompts[f"{task}_query"] = pair["query"]
        prompts[f"{task}_key"] = pair["key"]
    default = spec["instructions"][spec["default_task"]]
    return {**prompts, "query": default["query"], "document": default["key"]}
