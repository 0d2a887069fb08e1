"""What stock's constructor is given for a checked :class:`ModelPlan`.

A folder with ``modules.json`` goes to stock's own loader whole (every module type, custom code under
``trust_remote_code``, ``requirements``, saved ``truncate_dim``, prompts and similarity function). Only a folder
without ``modules.json`` is assembled here, from its known-model spec, and handed over as ``modules=``.
"""

from __future__ import annotations

from typing import Any

from st_npu import _compat
from st_npu.loading.folder import ModelPlan


def stock_arguments(plan: ModelPlan, stock_kwargs: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(model_name_or_path, keyword arguments)`` for stock's constructor. A known model's task instructions
    become prompts beneath the folder's saved prompts and the caller's own."""
    kwargs = dict(stock_kwargs)
    if plan.spec and plan.spec.get("instructions"):
        kwargs["prompts"] = {**instruction_prompts(plan.spec), **plan.prompts, **(kwargs.get("prompts") or {})}
    if plan.modules is not None:
        return str(plan.folder), kwargs
    spec = plan.spec
    modules = [
        _compat.new_transformer(str(plan.folder), spec["max_seq_length"], spec["do_lower_case"], kwargs.get("model_kwargs"),
                                spec.get("padding_side")),
        _compat.new_pooling(plan.hidden_size, spec["pooling_mode"]),
    ]
    kwargs["modules"] = modules + ([_compat.Normalize()] if spec["normalize"] else [])
    kwargs.setdefault("default_prompt_name", plan.default_prompt_name)
    kwargs.setdefault("similarity_fn_name", plan.similarity_fn_name)
    return None, kwargs


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
