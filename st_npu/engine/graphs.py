"""Graph mode: each static (rows, tokens) shape's forward captured once and replayed with one launch.

On Ascend, small-batch inference is bound by the host: eager torch_npu spends tens of microseconds of host time per
operator and BERT-base launches about 900 of them per batch. With static shapes every batch has one of a few shapes,
so :meth:`GraphRunner.capture` records the model's forward for each shape into a graph (``torch.npu.NPUGraph``, or
``torch.cuda.CUDAGraph`` through the same code), the graphs sharing one memory pool, largest first. Each graph reads
its inputs from one byte buffer (views of it, keyed like the features), so a whole batch arrives in one transfer.

A call that wants host rows (every bucket-grouped call of the engine) costs three launches per batch: the engine's
``preprocess`` hands the padded batch to :meth:`GraphRunner.stage`, which copies it host-to-device into its graph's
input buffer (stock's move to the device then has nothing to move); the engine's ``forward`` calls
:meth:`GraphRunner.replay`, which replays and copies the row output (``sentence_embedding``, or a reranker's
``scores``) straight to the host before any other replay can overwrite it. The graph is the staging thread's from the
copy in until its rows are out (``release`` on any error between). Only the row output of each graph stays
referenced, so the memory of every other output returns to the pool.

Anything else runs eagerly: shapes without a graph, other outputs (token embeddings), direct forward calls, and every
shape of a model whose capture failed (an operator the runtime refuses, a host sync in the transformer's code); that
model then logs one warning saying why. Replays run the same operators on the same data, so results do not change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from st_npu import _compat
from st_npu.engine.context import Batch

logger = logging.getLogger(__name__)

# (key, dtype, shape) of each tensor input, largest elements first so that every view of the byte buffer is aligned.
Layout = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]


def _graph_api(device: torch.device) -> tuple[type, Any, Any]:
    module = getattr(torch, device.type)
    graph_class = module.NPUGraph if device.type == "npu" else module.CUDAGraph
    return graph_class, module.graph, module.graph_pool_handle


@dataclass
class _Captured:
    graph: Any
    layout: Layout
    block: torch.Tensor  # every input as bytes, in one device buffer
    inputs: dict[str, torch.Tensor]  # views of ``block``: the static inputs the graph reads
    output: torch.Tensor  # the row output the graph writes; the next replay of any graph may overwrite it
    constants: dict[str, Any]  # outputs that are not tensors
    settings: dict[str, Any]  # inputs that are not tensors (a causal LM's logits_to_keep): the graph was made with them


class GraphRunner:
    """One model's captured graphs, one per static shape; one holder at a time (they share a pool and buffers)."""

    def __init__(self, model: Any, row_output: str) -> None:
        self.model = model
        self.row_output = row_output
        # A prompt's length changes nothing in a graph unless a module leaves the prompt out of its pooling.
        self.unread = frozenset() if _compat.reads_prompt_length(model) else frozenset({"prompt_length"})
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.failed: str | None = None
        self.lock = threading.Lock()

    def stage(self, features: MutableMapping[str, Any], batch: Batch) -> None:
        """Copy a padded host batch into its graph's input buffer in one transfer and point ``features`` at the
        buffer's views. The graph is then held, and recorded on ``batch`` (so that any error before its replay can
        release it), until ``replay`` or ``release``; nothing happens when no graph has this shape and layout."""
        captured = self.graphs.get(_shape(features))
        if captured is None or _layout(features) != captured.layout or self._settings(features) != captured.settings:
            return
        packed = _pack(features, captured.layout)
        self.lock.acquire()
        batch.staged = captured
        try:
            with torch.inference_mode():  # the buffer was made in inference mode, whatever mode the call runs in
                captured.block.copy_(packed)
        except BaseException:
            batch.staged = None
            self.lock.release()
            raise
        features.update(captured.inputs)

    def release(self) -> None:
        """Give back a graph staged and never replayed (an error between the two)."""
        self.lock.release()

    def replay(self, captured: _Captured, features: Mapping[str, Any]) -> dict[str, Any] | None:
        """Replay the graph ``features`` were staged into and return its outputs with the row output on the host;
        None, having released the graph, when ``features`` are no longer the staged views (a hook changed them):
        the caller then runs them eagerly."""
        try:
            if any(features.get(key) is not view for key, view in captured.inputs.items()):
                return None
            captured.graph.replay()
            return {**captured.constants, self.row_output: captured.output.to("cpu")}
        finally:
            self.lock.release()

    def capture(self, shapes: list[tuple[int, int]], sample: Any) -> int:
        """Capture each (rows, tokens) shape (largest first, one pool) from ``sample(rows, tokens)``'s host
        features; returns how many graphs the model has."""
        if self.failed:
            return 0
        device = self.model.device
        graph_class, graph_context, pool_handle = _graph_api(device)
        pool = pool_handle()
        device_context = torch.npu.device(device) if device.type == "npu" else torch.cuda.device(device)
        try:
            with device_context, torch.inference_mode():
                for rows, tokens in sorted(shapes, key=lambda shape: shape[0] * shape[1], reverse=True):
                    if (rows, tokens) not in self.graphs:
                        self.graphs[(rows, tokens)] = self._capture_one(sample(rows, tokens), graph_class,
                                                                        graph_context, pool)
        except RuntimeError as exc:
            self.graphs.clear()
            self.failed = str(exc).splitlines()[0]
            logger.warning("Graph capture failed on %s, so this model runs eagerly (same results, more host "
                           "overhead): %s", device, self.failed)
        return len(self.graphs)

    def _capture_one(self, features: Mapping[str, Any], graph_class: type, graph_context: Any,
                     pool: Any) -> _Captured:
        layout = _layout(features)
        packed = _pack(features, layout)
        block = packed.to(self.model.device)
        inputs = _views(block, layout)
        # The settings go in too: a causal LM's logits_to_keep keeps its LM head at the last position in the graph.
        settings = self._settings(features)
        forward = type(self.model).forward
        forward(self.model, {**settings, **inputs})  # compile every operator before capture, as torch_npu's docs advise
        graph = graph_class()
        # thread_local: a server's other device threads keep allocating while this one captures.
        with graph_context(graph, pool=pool, capture_error_mode="thread_local"):
            output = forward(self.model, {**settings, **inputs})
        rows = output.get(self.row_output)
        if not _is_tensor(rows):
            raise RuntimeError(f"the model's forward returns no {self.row_output} tensor")
        # Only the row output stays referenced: the other outputs' memory goes back to the pool for the next capture.
        constants = {key: value for key, value in output.items() if not _is_tensor(value)}
        block.copy_(packed)  # compile the copies in and out too
        graph.replay()
        rows.to("cpu")
        return _Captured(graph, layout, block, inputs, rows, constants, settings)

    def _settings(self, features: Mapping[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in features.items() if not _is_tensor(value) and key not in self.unread}

    def __getstate__(self) -> dict[str, Any]:  # graphs stay in their process; a pool worker runs eagerly
        return {"model": self.model, "row_output": self.row_output, "unread": self.unread, "graphs": {},
                "failed": self.failed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _shape(features: Mapping[str, Any]) -> tuple[int, int] | None:
    ids = features.get("input_ids")
    return tuple(ids.shape) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _layout(features: Mapping[str, Any]) -> Layout:
    tensors = sorted((key, value) for key, value in features.items() if _is_tensor(value))
    tensors.sort(key=lambda item: -item[1].element_size())
    return tuple((key, value.dtype, tuple(value.shape)) for key, value in tensors)


def _pack(features: Mapping[str, Any], layout: Layout) -> torch.Tensor:
    """The host tensors of ``features`` as one byte buffer, in ``layout`` order."""
    return torch.cat([features[key].reshape(-1).view(torch.uint8) for key, _, _ in layout])


def _views(block: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    views, start = {}, 0
    for key, dtype, shape in layout:
        end = start + torch.Size(shape).numel() * dtype.itemsize
        views[key] = block[start:end].view(dtype).view(shape)
        start = end
    return views
