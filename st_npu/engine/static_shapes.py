"""Static shapes: a few fixed (batch, sequence) shapes per corpus, so Ascend compiles a few operators once.

Ascend compiles an operator for every new input shape; stock sentence-transformers pads each batch to its own
longest text, so a corpus brings dozens of shapes and each one stalls (FlagEmbedding issue 1028). Here the
tokenized batch is padded, still on the CPU, up to a bucket length and a bucketed batch size; a forward hook
cuts the outputs back to the real rows and tokens, so ``encode`` returns exactly what it returns without
padding. Padding is numerically neutral: padded tokens are masked out of attention and pooling, padded rows
are copies of a real row and are dropped. Where graphs are captured (:mod:`st_npu.engine.graphs`), a padded batch
whose rows go back to the host is handed to the graph runner here, which copies it into its graph in one transfer.

Works on any stock ``SentenceTransformer`` (``enable(model)``), through two public extension points: an
instance attribute that wraps ``preprocess`` and a forward hook on the last module. ``disable(model)`` removes
both.
"""

from __future__ import annotations

import bisect
import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_SEQ_LENGTHS = (16, 32, 64, 128, 256, 512)
# Powers of two: a last partial batch of n rows costs at most 2n rows of compute.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ShapePolicy:
    """The bucket sizes; a batch is padded to the smallest bucket that holds it."""

    seq_lengths: tuple[int, ...] = DEFAULT_SEQ_LENGTHS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES

    def __post_init__(self) -> None:
        for name in ("seq_lengths", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"ShapePolicy.{name} must be positive integers, got {values!r}")
            object.__setattr__(self, name, tuple(sorted(set(values))))

    def for_model(self, max_seq_length: int | None) -> ShapePolicy:
        """Sequence buckets clipped to the model's limit, which is always a bucket itself."""
        if not max_seq_length:
            return self
        kept = tuple(length for length in self.seq_lengths if length < max_seq_length)
        return ShapePolicy(kept + (max_seq_length,), self.batch_sizes)

    def seq_bucket(self, length: int) -> int:
        return _bucket(self.seq_lengths, length)

    def batch_bucket(self, rows: int) -> int:
        return _bucket(self.batch_sizes, rows)

    def shapes(self, batch_size: int) -> list[tuple[int, int]]:
        """Every (rows, tokens) shape an encode with this batch size can produce."""
        largest = self.batch_bucket(batch_size)
        return [(rows, length) for rows in self.batch_sizes if rows <= largest for length in self.seq_lengths]


def _bucket(buckets: tuple[int, ...], value: int) -> int:
    position = bisect.bisect_left(buckets, value)
    if position < len(buckets):
        return buckets[position]
    # Beyond the table (a batch larger than any bucket): the next power of two keeps shapes few.
    return 1 << (value - 1).bit_length()


class _PaddedPreprocess:
    """Shadows ``model.preprocess`` on one instance: the stock result, padded to bucket shapes on the CPU."""

    def __init__(self, model: Any, policy: ShapePolicy, padding: bool = True) -> None:
        self.model = model
        self.policy = policy
        self.padding = padding  # False: bucket groups and encode's tails only, each batch at its own length
        # The graph runner (st_npu.engine.graphs) once it holds graphs: it takes a padded batch straight to the device.
        self.stager: Any = None
        # Per thread: encode calls in other threads have their own batch in flight, padding and options.
        self.pending = threading.local()
        # On the last module, not the model: sentence-transformers 5.x calls model.forward(), skipping its hooks.
        self.hook = model[-1].register_forward_hook(self.on_last_module)

    def __call__(self, *args: Any, **kwargs: Any) -> MutableMapping[str, Any]:
        features = type(self.model).preprocess(self.model, *args, **kwargs)
        # Outside encode (a user's own preprocess/tokenize call) stock's shapes are what the caller gets.
        if not getattr(self.pending, "inside", 0):
            return features
        features = self.pad(features)
        if self.stager is not None and getattr(self.pending, "tails", None) is not None:  # host rows wanted
            features = self.stager.stage(features)
        return features

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """The span of an encode call, where batches are padded."""
        self.pending.inside = getattr(self.pending, "inside", 0) + 1
        try:
            yield
        finally:
            self.pending.inside -= 1
            if self.stager is not None:
                self.stager.unstage()

    @contextlib.contextmanager
    def tails(self, truncate_dim: int | None, normalize: bool) -> Iterator[_Tails]:
        """Truncate and normalize ``sentence_embedding`` on the padded batch (a shape compiled once), not on the
        real rows after the trim (a new shape for every row count)."""
        previous = getattr(self.pending, "tails", None)
        self.pending.tails = tails = _Tails(truncate_dim, normalize)
        try:
            yield tails
        finally:
            self.pending.tails = previous

    def pad(self, features: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        ids = features.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            return features
        rows, length = ids.shape
        policy = self.policy.for_model(self.model.max_seq_length)
        target = (policy.batch_bucket(rows), policy.seq_bucket(length)) if self.padding else (rows, length)
        left = getattr(self.model.tokenizer, "padding_side", "right") == "left"
        pad_id = getattr(self.model.tokenizer, "pad_token_id", None) or 0
        padded = [key for key, value in features.items()
                  if isinstance(value, torch.Tensor) and value.shape[:2] == (rows, length)]
        for key in padded:
            features[key] = _pad(features[key], target, pad_id if key == "input_ids" else 0, left)
        self.pending.sizes = (target, rows, length, left, padded)
        return features

    def on_last_module(self, module: Any, args: tuple, output: Any) -> Any:
        """Forward hook: cut the outputs of a batch this padded back to its real rows and tokens."""
        features = args[0] if args and isinstance(args[0], Mapping) else {}
        return self.trim(features, output)

    def trim(self, features: Mapping[str, Any], output: Any) -> Any:
        sizes = getattr(self.pending, "sizes", None)
        ids = features.get("input_ids")
        if sizes is None or ids is None or tuple(ids.shape[:2]) != sizes[0] or not isinstance(output, MutableMapping):
            return output  # not a batch this padded (a direct call, training): leave it alone
        self.pending.sizes = None
        (padded_rows, padded_length), rows, length, left, padded_inputs = sizes
        tails = getattr(self.pending, "tails", None)
        if tails is not None and isinstance(output.get("sentence_embedding"), torch.Tensor):
            output["sentence_embedding"] = tails.apply(output["sentence_embedding"])
        tokens = slice(padded_length - length, None) if left else slice(0, length)
        for key, value in output.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == padded_rows:
                value = value[:rows]
                # Per-token tensors: the padded inputs and (rows, tokens, hidden) outputs such as token_embeddings.
                if (key in padded_inputs or value.ndim >= 3) and value.shape[1] == padded_length:
                    value = value[:, tokens]
                output[key] = value
        return output

    def __getstate__(self) -> dict[str, Any]:  # threading.local does not pickle (multi-process pools)
        return {"model": self.model, "policy": self.policy, "hook": self.hook, "padding": self.padding,
                "stager": self.stager}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.pending = threading.local()


class _Tails:
    """encode's ``truncate_dim``/``normalize_embeddings``, applied in the forward; records the rows' dtype."""

    def __init__(self, truncate_dim: int | None, normalize: bool) -> None:
        self.truncate_dim, self.normalize = truncate_dim, normalize
        self.dtype: torch.dtype | None = None

    def apply(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.dtype = embeddings.dtype
        if self.truncate_dim is not None:
            embeddings = embeddings[..., : self.truncate_dim]
        return torch.nn.functional.normalize(embeddings, p=2, dim=1) if self.normalize else embeddings


def _pad(value: torch.Tensor, target: tuple[int, int], fill: int, left: bool) -> torch.Tensor:
    rows, length = value.shape[:2]
    if target[0] > rows:  # extra rows repeat the last real one: fully masked rows could produce NaN
        value = torch.cat([value, value[-1:].expand(target[0] - rows, *value.shape[1:])])
    if target[1] > length:
        padding = value.new_full((target[0], target[1] - length, *value.shape[2:]), fill)
        value = torch.cat([padding, value] if left else [value, padding], dim=1)
    return value


def enable(model: Any, policy: ShapePolicy | None = None, padding: bool = True) -> ShapePolicy:
    """Pad this model's batches to bucket shapes from now on (again: replaces the policy). Returns the policy.

    ``padding=False`` keeps only the bucket-grouped encode (:mod:`st_npu.engine.grouping`): where shapes cost nothing
    to compile (the CPU), each batch stays at its own length, and static shapes count as off."""
    from st_npu.engine.grouping import GroupedEncode  # grouping builds on this module

    policy = policy or ShapePolicy()
    disable(model)
    model.preprocess = padder = _PaddedPreprocess(model, policy, padding)
    model.encode = GroupedEncode(model, padder)
    return policy


def disable(model: Any) -> None:
    """Back to stock dynamic shapes; a no-op when static shapes are off."""
    padder = model.__dict__.pop("preprocess", None)
    if isinstance(padder, _PaddedPreprocess):
        padder.hook.remove()
        model.__dict__.pop("encode", None)


def padder_of(model: Any) -> _PaddedPreprocess | None:
    padder = model.__dict__.get("preprocess")
    return padder if isinstance(padder, _PaddedPreprocess) else None


def policy_of(model: Any) -> ShapePolicy | None:
    padder = model.__dict__.get("preprocess")
    if not isinstance(padder, _PaddedPreprocess) or not padder.padding:
        return None
    return padder.policy.for_model(model.max_seq_length)


def warmup(model: Any, batch_size: int = 32, max_tokens: int | None = None, show_progress_bar: bool = True) -> int:
    """Run every bucket shape through ``encode`` so later encodes compile nothing; returns the shape count.

    ``max_tokens`` skips shapes of more padded tokens (rows x length) than that: a caller that never forms such
    batches (the server's token budget) need not compile them.

    Each shape runs twice, from real text of exactly the bucket's token count: once with every row full
    (transformers then skips the attention mask) and once with one row short (the masked path that padded
    batches take), so the whole encode path (tokenizer, transfer, forward, pooling, copy back) is exercised.
    A progress bar counts the shapes, and a summary line on standard error says how long they took.
    """
    from tqdm.auto import tqdm

    policy = policy_of(model)
    if policy is None:
        raise RuntimeError("warmup() needs static shapes: without them every new batch shape compiles anyway.")
    shapes = [(rows, length) for rows, length in policy.shapes(batch_size)
              if max_tokens is None or rows * length <= max_tokens]
    start = time.perf_counter()
    for rows, length in tqdm(shapes, desc=f"st_npu warm-up on {model.device}", unit="shape",
                             disable=not show_progress_bar):
        full = _text_of(length)
        model.encode([full] * rows, batch_size=rows, show_progress_bar=False)
        # normalize_embeddings runs in the forward, on the padded batch: its shapes compile here too.
        model.encode([full] * (rows - 1) + [_text_of(max(length - 1, 2))], batch_size=rows, show_progress_bar=False,
                     normalize_embeddings=True)
    if show_progress_bar and shapes:
        rows, length = max(rows for rows, _ in shapes), max(length for _, length in shapes)
        tqdm.write(f"st_npu warm-up: {len(shapes)} shapes (up to {rows} rows x {length} tokens) on {model.device} "
                   f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return len(shapes)


def sample_features(model: Any, rows: int, tokens: int) -> MutableMapping[str, Any]:
    """Stock-tokenized host features of exactly (rows, tokens), the last row short so the mask has padding."""
    texts = [_text_of(tokens)] * (rows - 1) + [_text_of(min(tokens, 3))]
    return type(model).preprocess(model, texts) if rows > 1 else type(model).preprocess(model, [_text_of(tokens)])


def _text_of(tokens: int) -> str:
    """A text that BERT-style tokenizers turn into exactly ``tokens`` ids ([CLS] + words + [SEP])."""
    return " ".join(["hello"] * max(tokens - 2, 0))
