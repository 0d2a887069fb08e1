"""Graph mode: each static (rows, tokens) shape's forward captured once and replayed with one launch.

On Ascend, small-batch encode is bound by the host: eager torch_npu spends tens of microseconds of host time per
operator and BERT-base launches about 900 of them per batch. With static shapes (:mod:`st_npu.static_shapes`)
every batch has one of a few shapes, so ``capture(model, batch_size)`` records the model's forward for each shape
into a graph (``torch.npu.NPUGraph``, or ``torch.cuda.CUDAGraph`` through the same code) with static input
buffers, the graphs sharing one memory pool, largest first. From then on the model's ``forward`` (an instance
attribute, so it works on stock models too) copies a batch into its shape's buffers, replays, and copies the
outputs out, packed as one buffer, before the next replay overwrites them. Stock ``encode`` is untouched.

Anything else runs eagerly: shapes without a graph, forward calls with extra arguments, and every shape of a
model whose capture failed (an operator the runtime refuses, a host sync in the transformer's code); that model
then logs one warning saying why. Replays run the same operators on the same data, so results do not change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from st_npu.static_shapes import padder_of, policy_of, sample_features

logger = logging.getLogger(__name__)


def unavailable_reason(device: torch.device) -> str | None:
    """Why graphs cannot be captured on ``device`` (None when they can)."""
    module = getattr(torch, device.type, None)
    if device.type == "npu":
        if not hasattr(module, "NPUGraph"):
            return "this torch_npu has no torch.npu.NPUGraph (graph capture needs torch_npu 2.5.1 or newer)"
        name = module.get_device_name(device.index)
        if "910A" in name:
            return f"{name} cannot capture graphs (910B and newer can)"
        return None
    if device.type == "cuda":
        return None if hasattr(module, "CUDAGraph") else "this torch has no torch.cuda.CUDAGraph"
    return f"graph capture runs on npu and cuda, not {device.type}"


def _graph_api(device: torch.device) -> tuple[type, Any, Any]:
    module = getattr(torch, device.type)
    graph_class = module.NPUGraph if device.type == "npu" else module.CUDAGraph
    return graph_class, module.graph, module.graph_pool_handle


@dataclass
class _Captured:
    graph: Any
    inputs: dict[str, torch.Tensor]  # the static input buffers, keyed like the features
    packed: torch.Tensor  # every tensor output as bytes, in one buffer (one copy out)
    layout: list[tuple[str, torch.dtype, torch.Size, int, int]]  # key, dtype, shape, byte start, byte end
    constants: dict[str, Any]  # outputs that are not tensors


class GraphRunner:
    """Shadows ``model.forward``: replays a captured graph for a batch whose shape has one, else runs eagerly."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.failed: str | None = None
        self.lock = threading.Lock()  # one graph's buffers serve one batch at a time

    def __call__(self, features: Mapping[str, Any], **kwargs: Any) -> Any:
        captured = None if kwargs else self.graphs.get(_shape(features))
        if captured is None or set(captured.inputs) != {k for k, v in features.items() if _is_tensor(v)}:
            return type(self.model).forward(self.model, features, **kwargs)
        with self.lock:
            for key, buffer in captured.inputs.items():
                buffer.copy_(features[key])
            captured.graph.replay()
            packed = captured.packed.clone()
        output = dict(features)
        output.update(captured.constants)
        for key, dtype, shape, start, end in captured.layout:
            output[key] = packed[start:end].view(dtype).view(shape)
        padder = padder_of(self.model)
        return padder.trim(features, output) if padder else output

    def capture(self, batch_size: int) -> int:
        """Capture every static shape of ``batch_size`` (largest first, one pool); returns how many it captured."""
        policy = policy_of(self.model)
        if policy is None or self.failed:
            return 0
        device = self.model.device
        graph_class, graph_context, pool_handle = _graph_api(device)
        pool = pool_handle()
        shapes = sorted(policy.shapes(batch_size), key=lambda shape: shape[0] * shape[1], reverse=True)
        device_context = torch.npu.device(device) if device.type == "npu" else torch.cuda.device(device)
        try:
            with device_context, torch.inference_mode():
                for rows, tokens in shapes:
                    if (rows, tokens) not in self.graphs:
                        self.graphs[(rows, tokens)] = self._capture_one(rows, tokens, graph_class, graph_context, pool)
        except RuntimeError as exc:
            self.graphs.clear()
            self.failed = str(exc).splitlines()[0]
            logger.warning("Graph capture failed on %s, so this model runs eagerly (same results, more host "
                           "overhead): %s", device, self.failed)
        return len(self.graphs)

    def _capture_one(self, rows: int, tokens: int, graph_class: type, graph_context: Any, pool: Any) -> _Captured:
        features = sample_features(self.model, rows, tokens)
        inputs = {key: value.to(self.model.device) for key, value in features.items() if _is_tensor(value)}
        forward = type(self.model).forward
        forward(self.model, dict(inputs))  # compile every operator before capture, as torch_npu's docs advise
        graph = graph_class()
        with graph_context(graph, pool=pool):
            output = forward(self.model, dict(inputs))
            tensors = sorted(((key, value) for key, value in output.items() if _is_tensor(value)),
                             key=lambda item: -item[1].element_size())  # each piece starts aligned for its dtype
            packed = torch.cat([value.reshape(-1).view(torch.uint8) for _, value in tensors])
        layout, start = [], 0
        for key, value in tensors:
            end = start + value.numel() * value.element_size()
            layout.append((key, value.dtype, value.shape, start, end))
            start = end
        constants = {key: value for key, value in output.items() if not _is_tensor(value)}
        captured = _Captured(graph, inputs, packed, layout, constants)
        for key, buffer in inputs.items():  # compile the copies in and out too
            buffer.copy_(buffer.clone())
        graph.replay()
        packed.clone()
        return captured

    def __getstate__(self) -> dict[str, Any]:  # graphs stay in their process; a pool worker runs eagerly
        return {"model": self.model, "graphs": {}, "failed": self.failed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _shape(features: Mapping[str, Any]) -> tuple[int, int] | None:
    ids = features.get("input_ids")
    return tuple(ids.shape) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def enable(model: Any) -> GraphRunner:
    """Route this model's forward through a graph runner (idempotent); ``capture`` then records the graphs."""
    runner = runner_of(model)
    if runner is None:
        runner = model.forward = GraphRunner(model)
    return runner


def disable(model: Any) -> None:
    if runner_of(model) is not None:
        del model.__dict__["forward"]


def runner_of(model: Any) -> GraphRunner | None:
    runner = model.__dict__.get("forward")
    return runner if isinstance(runner, GraphRunner) else None
