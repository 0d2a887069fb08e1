"""Bucket-grouped encode: the texts of one call that fall into different sequence buckets run as separate groups.

Stock ``encode`` sorts a call's texts by length and cuts batches from that order, so one long text pads every
short text of its batch to the long one's bucket (the seed's 23 sentences: padding efficiency 0.13). Here the
call is split by sequence bucket (:mod:`st_npu.engine.static_shapes`), each group goes through stock ``encode`` on its
own, and the rows are put back in input order; a single group is one call, as before.

The groups ask stock for host rows (``convert_to_numpy``), and the options that would run device operators on the
real row count are done where they cost no new shape: ``normalize_embeddings`` (and ``truncate_dim``) on the padded
batch inside the forward (row-wise, so every row's value is the one stock computes), ``convert_to_tensor`` as one
host-to-device copy of the assembled rows instead of stock's ``torch.stack`` on the device (a new operator shape
for every row count). ``precision`` is applied to the whole call with stock's ``quantize_embeddings``, as stock
does. Output order, types, dtypes and devices are stock's; anything else (token embeddings, pools, non-string or
non-list input, an unknown prompt name) goes to stock unchanged.

Installed as the instance attribute ``encode`` by ``static_shapes.enable``; it also marks the span in which the
padding ``preprocess`` pads, so ``tokenize``/``preprocess`` called outside ``encode`` return stock's shapes.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from st_npu import _compat
from st_npu.engine.tokenizer_lock import tokenizer_lock


class GroupedEncode:
    """Shadows ``model.encode``: bucket groups, compile-free tails, padding only inside."""

    def __init__(self, model: Any, padder: Any) -> None:
        self.model = model
        self.padder = padder

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        stock_encode = type(model).encode
        try:
            bound = _compat.stock_encode_signature().bind(model, *args, **kwargs)
        except TypeError:
            bound = None
        with self.padder.inside():
            if bound is None or not self._groupable(bound):
                return stock_encode(model, *args, **kwargs)
            return self._grouped(bound, stock_encode)

    def _groupable(self, bound: inspect.BoundArguments) -> bool:
        bound.apply_defaults()
        options = bound.arguments
        inputs = options[_compat.ENCODE_INPUTS]
        texts = [inputs] if isinstance(inputs, str) else inputs
        prompt_name = options.get("prompt_name")
        return (isinstance(texts, list) and bool(texts) and all(isinstance(text, str) for text in texts)
                and options.get("output_value") == "sentence_embedding" and options.get("pool") is None
                and not isinstance(options.get("device"), list)
                and (prompt_name is None or prompt_name in self.model.prompts))

    def _grouped(self, bound: inspect.BoundArguments, stock_encode: Any) -> Any:
        model, options = self.model, dict(bound.arguments)
        options.pop("self", None)
        extra = options.pop("kwargs", {})
        inputs = options.pop(_compat.ENCODE_INPUTS)
        singular = isinstance(inputs, str)
        texts = [inputs] if singular else inputs
        precision = options.pop("precision")
        convert_to_tensor = options.pop("convert_to_tensor")
        convert_to_numpy = options.pop("convert_to_numpy") and not convert_to_tensor
        truncate_dim = options["truncate_dim"] if options["truncate_dim"] is not None else model.truncate_dim
        normalize = bool(options["normalize_embeddings"])
        options.update(precision=None, convert_to_numpy=True, convert_to_tensor=False, normalize_embeddings=False)

        rows: np.ndarray | None = None
        with self.padder.tails(truncate_dim, normalize) as tails:
            for indices in self._groups(texts, options):
                part = stock_encode(model, [texts[i] for i in indices], **options, **extra)
                if rows is None:
                    rows = np.empty((len(texts), *part.shape[1:]), dtype=part.dtype)
                rows[indices] = part
        if precision and precision != "float32":
            rows = _compat.quantize_embeddings(rows, precision)
        if convert_to_tensor or not convert_to_numpy:
            tensor = torch.from_numpy(rows)
            if not (precision and precision != "float32"):  # stock keeps float rows on the device, in their dtype
                device = torch.device(options["device"]) if options["device"] is not None else model.device
                tensor = tensor.to(device=device, dtype=tails.dtype or tensor.dtype)
            result: Any = tensor if convert_to_tensor else list(tensor)
        else:
            result = rows
        return result[0] if singular else result

    def _groups(self, texts: list[str], options: dict[str, Any]) -> list[list[int]]:
        """Input positions grouped by the sequence bucket of their token count (prompt included)."""
        model = self.model
        prompt = options.get("prompt")
        if prompt is None:
            name = options.get("prompt_name") or model.default_prompt_name
            prompt = model.prompts.get(name, "") if name else ""
        with tokenizer_lock(model.tokenizer):
            encoded = model.tokenizer([prompt + text for text in texts], truncation=True,
                                      max_length=model.max_seq_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        policy = self.padder.policy.for_model(model.max_seq_length)
        groups: dict[int, list[int]] = {}
        for position, length in enumerate(lengths):
            groups.setdefault(policy.seq_bucket(length), []).append(position)
        return [groups[bucket] for bucket in sorted(groups)]
