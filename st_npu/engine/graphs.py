"""Graph mode: each static (rows, tokens) shape's forward captured once and replayed with one launch.

On Ascend, small-batch encode is bound by the host: eager torch_npu spends tens of microseconds of host time per
operator and BERT-base launches about 900 of them per batch. With static shapes (:mod:`st_npu.engine.static_shapes`)
every batch has one of a few shapes, so ``capture(model, batch_size)`` records the model's forward for each shape
into a graph (``torch.npu.NPUGraph``, or ``torch.cuda.CUDAGraph`` through the same code), the graphs sharing one
memory pool, largest first. Each graph reads its inputs from one byte buffer (views of it, keyed like the
features), so a whole batch arrives in one transfer.

An encode that wants host rows (every bucket-grouped encode, :mod:`st_npu.engine.grouping`) costs three launches per
batch: the padding ``preprocess`` hands its batch to ``stage``, which copies it host-to-device into its graph's
input buffer and returns views of that buffer (stock's move to the device then has nothing to move); the
model's ``forward`` (an instance attribute, so this works on stock models too) replays and copies
``sentence_embedding`` straight to the host, before any other replay can overwrite it (encode's
``normalize_embeddings`` and ``truncate_dim`` then run on those host rows: no device launch). The graph is the
staging thread's from the copy in until its rows are out. Only the embedding of each graph stays referenced, so
the memory of every other output returns to the pool. Stock ``encode`` is untouched.

Anything else runs eagerly: shapes without a graph, other outputs (token embeddings), direct forward calls,
and every shape of a model whose capture failed (an operator the runtime refuses, a host sync in the
transformer's code); that model then logs one warning saying why. Replays run the same operators on the same
data, so results do not change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from st_npu.engine import static_shapes
from st_npu.runtime.devices import graph_capture_unavailable as unavailable_reason
from st_npu.engine.static_shapes import padder_of, policy_of, sample_features

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
    embedding: torch.Tensor  # the sentence_embedding the graph writes; the next replay of any graph may overwrite it
    constants: dict[str, Any]  # outputs that are not tensors


class GraphRunner:
    """Shadows ``model.forward``: replays the graph a batch was staged into, and runs any other forward eagerly."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.failed: str | None = None
        # One holder at a time: the graphs share one memory pool and each has one set of input buffers.
        self.lock = threading.Lock()
        self.staged = threading.local()  # the graph this thread holds, from ``stage`` to its forward

    def stage(self, features: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Put a padded host batch whose rows go back to the host into its graph's input buffer, in one copy.

        Called by the padding ``preprocess`` on the encoding thread, right before stock moves the batch to the
        device; the returned features are views of the buffer, already there. Holds the graph until this
        thread's forward has copied its rows out (or ``unstage``, should the forward never come)."""
        captured = self.graphs.get(_shape(features))
        if captured is None or _layout(features) != captured.layout:
            return features
        packed = _pack(features, captured.layout)
        self.lock.acquire()
        try:
            with torch.inference_mode():  # the buffer was made in inference mode, whatever mode encode runs in
                captured.block.copy_(packed)
        except BaseException:
            self.lock.release()
            raise
        self.staged.captured = captured
        features.update(captured.inputs)
        return features

    def unstage(self) -> None:
        """Release a graph this thread staged a batch into and never replayed (an error between the two)."""
        if getattr(self.staged, "captured", None) is not None:
            self.staged.captured = None
            self.lock.release()

    def __call__(self, features: Mapping[str, Any], **kwargs: Any) -> Any:
        staged = getattr(self.staged, "captured", None)
        if staged is None:
            return type(self.model).forward(self.model, features, **kwargs)
        self.staged.captured = None
        try:
            if kwargs or any(features.get(key) is not view for key, view in staged.inputs.items()):
                # Not the staged batch as staged (a hook changed it): eager, still holding the buffers it may read.
                return type(self.model).forward(self.model, features, **kwargs)
            staged.graph.replay()
            rows = staged.embedding.to("cpu")
        finally:
            self.lock.release()
        # Stock reads only sentence_embedding here; the inputs and other outputs stay in the graph's buffers.
        # Only the padder stages, so it is there to cut the padded rows off.
        return padder_of(self.model).trim(features, {**staged.constants, "sentence_embedding": rows})

    def capture(self, batch_size: int, max_tokens: int | None = None) -> int:
        """Capture every static shape of ``batch_size`` of at most ``max_tokens`` padded tokens (largest first, one
        pool); returns how many graphs the model has."""
        padder, policy = padder_of(self.model), policy_of(self.model)
        if policy is None or self.failed:
            return 0
        device = self.model.device
        graph_class, graph_context, pool_handle = _graph_api(device)
        pool = pool_handle()
        shapes = sorted((shape for shape in policy.shapes(batch_size)
                         if max_tokens is None or shape[0] * shape[1] <= max_tokens),
                        key=lambda shape: shape[0] * shape[1], reverse=True)
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
        padder.stager = self if self.graphs else None
        return len(self.graphs)

    def _capture_one(self, rows: int, tokens: int, graph_class: type, graph_context: Any, pool: Any) -> _Captured:
        features = sample_features(self.model, rows, tokens)
        layout = _layout(features)
        packed = _pack(features, layout)
        block = packed.to(self.model.device)
        inputs = _views(block, layout)
        forward = type(self.model).forward
        forward(self.model, dict(inputs))  # compile every operator before capture, as torch_npu's docs advise
        graph = graph_class()
        # thread_local: a server's other device threads keep allocating while this one captures.
        with graph_context(graph, pool=pool, capture_error_mode="thread_local"):
            output = forward(self.model, dict(inputs))
        embedding = output.get("sentence_embedding")
        if not _is_tensor(embedding):
            raise RuntimeError("the model's forward returns no sentence_embedding tensor")
        # Only the embedding stays referenced: the other outputs' memory goes back to the pool for the next capture.
        constants = {key: value for key, value in output.items() if not _is_tensor(value)}
        block.copy_(packed)  # compile the copies in and out too
        graph.replay()
        embedding.to("cpu")
        return _Captured(graph, layout, block, inputs, embedding, constants)

    def __getstate__(self) -> dict[str, Any]:  # graphs stay in their process; a pool worker runs eagerly
        return {"model": self.model, "graphs": {}, "failed": self.failed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()
        self.staged = threading.local()


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


def warmup(model: Any, batch_size: int = 32, max_tokens: int | None = None, show_progress_bar: bool = True) -> int:
    """Compile every static shape (:func:`st_npu.engine.static_shapes.warmup`, same arguments), then capture each one's
    graph where graph mode is on; returns how many shapes ran."""
    shapes = static_shapes.warmup(model, batch_size, max_tokens=max_tokens, show_progress_bar=show_progress_bar)
    runner = runner_of(model)
    if runner is not None:
        runner.capture(batch_size, max_tokens=max_tokens)
    return shapes


def enable(model: Any) -> GraphRunner:
    """Route this model's forward through a graph runner (idempotent); ``capture`` then records the graphs."""
    runner = runner_of(model)
    if runner is None:
        runner = model.forward = GraphRunner(model)
    return runner


def disable(model: Any) -> None:
    if runner_of(model) is not None:
        del model.__dict__["forward"]
        padder = padder_of(model)
        if padder is not None:
            padder.stager = None


def runner_of(model: Any) -> GraphRunner | None:
    runner = model.__dict__.get("forward")
    return runner if isinstance(runner, GraphRunner) else None
