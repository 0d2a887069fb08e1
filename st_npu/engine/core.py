"""``accelerate(model, options)``: the one entry point of the engine, the same for every door.

``st_npu.SentenceTransformer`` and ``st_npu.CrossEncoder`` call it from their constructors, ``st_npu.patch()`` on
every stock model it sees built, the server and the corpus workers on the models they load. It installs one
:class:`Engine` on the model through public extension points only: instance attributes that shadow the stock entry
(``encode``/``predict``), ``preprocess`` and ``forward`` (see ``_compat.Kind`` for why those), forward hooks for the
attention masks, and ``_input_length`` (the order stock sorts a call's inputs in). ``Engine.undo()`` removes them all.
Where the model's class has an entry that is not stock's (a mock or wrapper set on the class, a subclass's
override), the shadowing entry calls that one as it is and the engine steps aside for the call.

What every accelerated model gets, whichever door it came through:
- the input check (:mod:`.checks`) and a known model's per-prompt length limit (llm-embedder: 256-token queries);
- one tokenisation per call, bucket groups and compile-free tails (:mod:`.tokens`, :mod:`.grouping`);
- static shapes where they pay (:mod:`.static_shapes`; on by default on npu), bool SDPA masks on npu that keep the
  model's own attention (:mod:`.attention`, from the model's family: :mod:`.family`), captured graphs where the
  device can capture (:mod:`.graphs`), the next batches prepared on a host thread while the device computes
  (:mod:`.overlap`), out-of-memory backoff (:mod:`.oom`).
A model whose first module is not a Hugging Face transformer (StaticEmbedding, WordEmbeddings, a Router) has nothing
to bucket: ``accelerate`` leaves it to stock's path and says so at debug level.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from st_npu import _compat
from st_npu.engine import attention, checks, context, family, finite, grouping
from st_npu.engine.context import Call
from st_npu.engine.graphs import GraphRunner
from st_npu.engine.oom import Backoff
from st_npu.engine.overlap import Prefetcher
from st_npu.engine.static_shapes import DEFAULT_MAX_BATCH_TOKENS, ShapePolicy, Tails, pad, trim
from st_npu.engine.tokenizer_lock import tokenizer_lock
from st_npu.engine.tokens import Tokens, key_of
from st_npu.runtime.devices import graph_capture_unavailable

logger = logging.getLogger(__name__)
ATTRIBUTE = "_st_npu_engine"


@dataclass(frozen=True)
class Options:
    """What the engine turns on. ``None`` means: where it pays on the model's device."""

    static_shapes: bool | ShapePolicy | None = None  # None: on for npu; a ShapePolicy sets the buckets
    graphs: bool | None = None  # None: where static shapes are on and the device can capture; True insists
    overlap: bool | None = None  # None: on for accelerators, off on the CPU (the thread would compete for cores)
    spec: dict[str, Any] | None = None  # a known-model spec (configs/models): per-prompt length limits
    max_batch_tokens: int | None = None  # padded rows x length per batch; None: DEFAULT_MAX_BATCH_TOKENS


def accelerate(model: Any, options: Options = Options()) -> Engine | None:
    """Install the engine on ``model`` (again: replaces the one it has); None where stock's path stays."""
    previous = engine_of(model)
    if previous is not None:
        previous.undo()
    kind = _compat.model_kind(model)
    if kind is None or _compat.hf_transformer(model) is None:
        logger.debug("st_npu: %s has no Hugging Face transformer module first; it runs stock's path",
                     type(model).__name__)
        return None
    return Engine(model, kind, options)


def engine_of(model: Any) -> Engine | None:
    return model.__dict__.get(ATTRIBUTE)


def check_budget(max_batch_tokens: int | None) -> int:
    """The token budget per batch, ``DEFAULT_MAX_BATCH_TOKENS`` for None; a clear error for anything but a positive
    integer."""
    if max_batch_tokens is None:
        return DEFAULT_MAX_BATCH_TOKENS
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive integer (padded rows x tokens per batch), "
                         f"got {max_batch_tokens!r}")
    return max_batch_tokens


def _as_rows(result: Any, singular: bool) -> Any:
    """A call's result with one entry per input: a singular input's result as a batch of one."""
    if not singular:
        return result
    return result[None] if isinstance(result, (torch.Tensor, np.ndarray)) else [result]


class Engine:
    """The engine on one model: its entry, preprocess and forward, and what they share."""

    def __init__(self, model: Any, kind: _compat.Kind, options: Options) -> None:
        self.model, self.kind, self.options = model, kind, options
        device = model.device
        static = options.static_shapes if options.static_shapes is not None else device.type == "npu"
        self.padding = bool(static)  # off: bucket groups only, each batch at its own length
        self.buckets = static if isinstance(static, ShapePolicy) else ShapePolicy()
        self.max_batch_tokens = check_budget(options.max_batch_tokens)
        self.signature = _compat.entry_signature(model, kind)
        self.inputs_name = list(self.signature.parameters)[1]
        self.family = family.learn(model)
        self.left, self.pad_id = self.family.left, self.family.pad_id  # where padding goes and with which id
        if self.family.caches:  # no call reads a key/value cache; building one each forward stops graph capture
            model[0].auto_model.config.use_cache = False
        self.prefetch = options.overlap if options.overlap is not None else device.type != "cpu"
        self.last_prefetch = {"hits": 0, "misses": 0}
        self.backoff = Backoff()
        self.graphs = self._graph_runner(options.graphs)
        self.hooks = attention.enable(model, self.family) if device.type == "npu" else []
        self._shadowed = {kind.entry: self.entry, "preprocess": self.preprocess, "forward": self.forward,
                          "_input_length": self.input_length, ATTRIBUTE: self}
        model.__dict__.update(self._shadowed)

    def undo(self) -> None:
        """Stock behaviour again: every shadowing attribute and hook removed, graphs dropped, a decoder's cache setting
        restored."""
        for name, value in self._shadowed.items():
            if self.model.__dict__.get(name) is value:
                del self.model.__dict__[name]
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.graphs is not None:
            self.graphs.graphs.clear()
        if self.family.caches:
            self.model[0].auto_model.config.use_cache = True

    # --- policy --------------------------------------------------------------------------------------------------

    @property
    def policy(self) -> ShapePolicy | None:
        """The bucket shapes batches are padded to; None where static shapes are off."""
        return self.buckets.for_model(self.model.max_seq_length) if self.padding else None

    def _graph_runner(self, wanted: bool | None) -> GraphRunner | None:
        if wanted is False:
            return None
        reason = graph_capture_unavailable(self.model.device) or (None if self.padding else "graphs need static shapes")
        if reason is None and self.kind.stacked:
            # A replay hands stock host rows; a sparse encoder's stock code makes its sparse rows on the device.
            reason = "a sparse encoder's rows become sparse tensors on the device, which a replay's host rows are not"
        if reason is None:
            return GraphRunner(self.model, self.kind.row_output)
        if wanted:
            raise ValueError(f"graphs=True: {reason}")
        return None

    def prompt_limit(self, prompt_name: str | None) -> int | None:
        """The token limit a known model's spec sets for texts with this prompt: llm-embedder caps queries
        (``query``, ``{task}_query``) at 256 tokens and keys (``document``, ``{task}_key``) at 512, as FlagEmbedding
        does; None for other prompts and models."""
        spec = self.options.spec
        if not spec or not prompt_name:
            return None
        for side, alias in (("query", "query"), ("key", "document")):
            if prompt_name == alias or prompt_name.endswith(f"_{side}"):
                return spec.get(f"{side}_max_length")
        return None

    # --- the call --------------------------------------------------------------------------------------------

    def entry(self, *args: Any, **kwargs: Any) -> Any:
        """The stock entry (``encode``/``predict``), run by bucket groups from tokens computed once."""
        model = self.model
        stock_entry = getattr(type(model), self.kind.entry)
        if self.kind.replaced_on(model):  # the caller's own entry, called as they wrote it
            return stock_entry(model, *args, **kwargs)
        try:
            bound = self.signature.bind(model, *args, **kwargs)
        except TypeError:  # a bad call: let stock say what is wrong with it
            return stock_entry(model, *args, **kwargs)
        bound.apply_defaults()
        inputs = bound.arguments[self.inputs_name]
        singular = model.is_singular_input(inputs)
        if self.kind.entry == "encode":
            checks.check_texts(inputs, singular=isinstance(inputs, str) or singular)
        self._limit_prompt(bound)
        items = [inputs] if singular else inputs
        tokens = self._tokens(items, bound) if grouping.groupable(model, self.kind, bound.arguments, items) \
            and not self._stock_is_as_good(bound) else None
        if tokens is None:
            with context.calling(self, Call()) as call:
                result = self._finishing(call, lambda: stock_entry(*bound.args, **bound.kwargs))
            finite.check_result(_as_rows(result, singular), len(items), grouping.model_dtype(model), self.kind.entry)
            return result
        tails = grouping.call_tails(model, self.kind, bound.arguments)
        lengths = [tokens.lengths[position] for position in tokens.positions(items)]
        buckets = self.buckets.for_model(model.max_seq_length)
        positions = grouping.groups(lengths, buckets)
        batch_size = bound.arguments["batch_size"]
        sizes = [buckets.rows_for(lengths[group[0]], batch_size, self.max_batch_tokens) for group in positions]
        positions, sizes = grouping.join_single_rows(positions, sizes)
        with context.calling(self, Call(tokens=tokens, tails=tails)) as call:
            return self._finishing(call, lambda: self._grouped(call, bound, items, singular, positions, sizes))

    def _stock_is_as_good(self, bound: inspect.BoundArguments) -> bool:
        """One row a batch, no static shapes and no tokens handed in (a server's): nothing pads and no shape is
        new, so tokenising the call up front and grouping it would buy nothing for its cost."""
        given = context.current(self)
        return bound.arguments.get("batch_size") == 1 and not self.padding and (given is None or given.tokens is None)

    def _grouped(self, call: Call, bound: inspect.BoundArguments, items: list[Any], singular: bool,
                 positions: list[list[int]], sizes: list[int]) -> Any:
        if self.prefetch and len(items) > min(sizes):
            call.prefetcher = Prefetcher(functools.partial(self._prepare, call))
        try:
            return grouping.run(self.model, self.kind, bound, items, singular, positions, call.tails, sizes,
                                before_group=self._predict_batches if call.prefetcher is not None else None)
        finally:
            if call.prefetcher is not None:
                call.prefetcher.close()
                self.last_prefetch = {"hits": call.prefetcher.hits, "misses": call.prefetcher.misses}

    def _predict_batches(self, group: list[Any], batch_size: int) -> None:
        """Tell the call's prefetcher which batches stock will form from this group, in order."""
        context.current(self).prefetcher.expect(_compat.predicted_batches(self.model, group, batch_size) or [])

    def _finishing(self, call: Call, run: Any) -> Any:
        try:
            return run()
        finally:
            if call.batch is not None and call.batch.staged is not None:  # staged, never replayed: an error between
                call.batch = None
                self.graphs.release()

    def _tokens(self, items: list[Any], bound: inspect.BoundArguments) -> Tokens | None:
        """The call's tokens: those a caller computed already (the server's admission), else computed now."""
        given = context.current(self)
        kwargs = self._preprocess_kwargs(bound)
        if given is not None and given.tokens is not None and given.tokens.kwargs == kwargs \
                and given.tokens.positions(items) is not None:
            return given.tokens
        return self.tokenize(items, **kwargs)

    def tokenize(self, items: list[Any], **kwargs: Any) -> Tokens | None:
        """``items`` tokenised by stock's ``preprocess`` with ``kwargs`` (the prompt and options stock passes)."""
        return Tokens.of(items, functools.partial(type(self.model).preprocess, self.model),
                         tokenizer_lock(self.model.tokenizer), self.left, self.pad_id, kwargs)

    def tokens_from_ids(self, items: list[Any], ids: list[list[int]], **entry_kwargs: Any) -> Tokens | None:
        """Tokens for a call with ``entry_kwargs`` made from token ids a caller computed already (a server's
        admission), as stock's ``preprocess`` would make them; None where they would differ (then tokenise)."""
        kwargs = self.preprocess_kwargs(**entry_kwargs)
        with tokenizer_lock(self.model.tokenizer):
            sample = type(self.model).preprocess(self.model, items[:1], **kwargs)
        return Tokens.from_ids(items, ids, sample, kwargs, self.pad_id,
                               getattr(self.model.tokenizer, "sep_token_id", None), self.left)

    def given_tokens(self, tokens: Tokens) -> Any:
        """A context in which this thread's calls take ``tokens`` (computed earlier, e.g. by a server at admission)
        instead of tokenising their inputs again: ``with engine.given_tokens(tokens): model.encode(texts, ...)``."""
        return context.calling(self, Call(tokens=tokens))

    def preprocess_kwargs(self, **entry_kwargs: Any) -> dict[str, Any]:
        """What a call of the entry with ``entry_kwargs`` (no inputs) passes to ``preprocess`` besides the batch: the
        prompt and options tokens for that call must be made with (``tokenize(items, **preprocess_kwargs(...))``)."""
        bound = self.signature.bind(self.model, [], **entry_kwargs)
        bound.apply_defaults()
        self._limit_prompt(bound)
        return self._preprocess_kwargs(bound)

    def _limit_prompt(self, bound: inspect.BoundArguments) -> None:
        """A known model's per-prompt length limit, as the call's own processing kwargs: ``max_seq_length`` is
        shared by every thread."""
        limit = self.prompt_limit(bound.arguments.get("prompt_name"))
        if limit is not None and limit < self.model.max_seq_length:
            bound.arguments["kwargs"] = _compat.with_max_length(bound.arguments.get("kwargs", {}), limit)

    def _preprocess_kwargs(self, bound: inspect.BoundArguments) -> dict[str, Any]:
        """What stock will pass to ``preprocess`` besides the batch: the resolved prompt and the call's kwargs."""
        options = bound.arguments
        prompt = options.get("prompt")
        if prompt is None:
            name = options.get("prompt_name") or getattr(self.model, "default_prompt_name", None)
            prompt = self.model.prompts.get(name) if name else None
        return {"prompt": prompt, **options.get("kwargs", {})}

    # --- per batch ---------------------------------------------------------------------------------------------

    def input_length(self, item: Any) -> int:
        """Stock's sort key: the true token count where the running call knows it (every door sorts alike)."""
        call = context.current(self)
        position = call.tokens.index.get(key_of(item)) if call is not None and call.tokens is not None else None
        return call.tokens.lengths[position] if position is not None else type(self.model)._input_length(item)

    def preprocess(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Stock ``preprocess`` inside a call: the batch from the call's tokens, padded, staged into its graph."""
        call = context.current(self)
        if call is None or args:  # outside a call (a user's own preprocess or tokenize): stock's shapes
            return type(self.model).preprocess(self.model, inputs, *args, **kwargs)
        if call.prefetcher is not None:
            features, batch = call.prefetcher(inputs, **kwargs)
        else:
            features, batch = self._prepare(call, inputs, **kwargs)
        call.batch = batch
        if batch is not None and call.tails is not None and self.graphs is not None and self.graphs.graphs:
            self.graphs.stage(features, batch)
        return features

    def _prepare(self, call: Call, inputs: Any, **kwargs: Any) -> tuple[Any, Any]:
        """A batch's host features, padded: host work only, so it may run ahead on the prefetch thread."""
        features = None
        if call.tokens is not None and kwargs == call.tokens.kwargs:
            features = call.tokens.features(inputs)
        if features is None:
            with tokenizer_lock(self.model.tokenizer):
                features = type(self.model).preprocess(self.model, inputs, **kwargs)
        policy = self.policy
        target = None
        ids = features.get("input_ids") if hasattr(features, "get") else None
        if policy is not None and isinstance(ids, torch.Tensor) and ids.ndim == 2:
            target = (policy.batch_bucket(ids.shape[0]), policy.seq_bucket(ids.shape[1]))
        features, batch = pad(features, target, self.pad_id, self.left)
        if batch is not None and call.tokens is not None:
            batch.positions = call.tokens.positions(inputs)
        return features, batch

    def forward(self, features: Any, **kwargs: Any) -> Any:
        """Stock forward: the staged batch's graph replayed, else eager with out-of-memory backoff; the outputs
        cut back to the batch's real rows and tokens."""
        call = context.current(self)
        batch = call.batch if call is not None else None
        if call is not None:
            call.batch = None
        if batch is not None and batch.staged is not None:
            staged, batch.staged = batch.staged, None
            output = self.graphs.replay(staged, features) if not kwargs else None
            if kwargs:
                self.graphs.release()
            if output is not None:
                return trim(output, batch, call.tails, self.kind.row_output)
        stock_forward = functools.partial(type(self.model).forward, self.model)
        output = self.backoff(stock_forward, features, self.model.device, kwargs,
                              batch.positions if batch is not None else None)
        return trim(output, batch, call.tails, self.kind.row_output) if batch is not None else output

    # --- warm-up ---------------------------------------------------------------------------------------------

    def warmup(self, batch_size: int = 32, max_tokens: int | None = None, show_progress_bar: bool = True) -> int:
        """Compile every shape a call with ``batch_size`` forms under the token budget (:meth:`compile_shapes`), then
        capture each one's graph where graph mode is on (:meth:`capture`); returns how many shapes ran. Without
        static shapes (the CPU) it runs the same bucket shapes, as encoding them would. A progress bar counts
        the shapes; a summary line on standard error gives shapes, graphs, the budget and the time."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        shapes = self.compile_shapes(batch_size, max_tokens, show_progress_bar)
        captured = self.capture(batch_size, max_tokens)
        if show_progress_bar and shapes:
            rows, length = max(rows for rows, _ in shapes), max(length for _, length in shapes)
            tqdm.write(f"st_npu warm-up: {len(shapes)} shapes (up to {rows} rows x {length} tokens), {captured} "
                       f"graphs, budget {self.budget(max_tokens):,} tokens per batch, on {self.model.device} in "
                       f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        return len(shapes)

    def budget(self, max_tokens: int | None = None) -> int:
        """The padded tokens a batch may hold: the engine's budget, or a caller's smaller one."""
        return min(max_tokens, self.max_batch_tokens) if max_tokens is not None else self.max_batch_tokens

    def shapes(self, batch_size: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
        """The (rows, tokens) shapes a call with ``batch_size`` forms under the token budget (or a caller's smaller
        ``max_tokens``, as a server that never forms larger batches): the bucket shapes where static shapes are
        on, the same bucket lengths where they are off. A single text above the budget, which runs alone, is left
        to compile when it comes: warming it up could need more memory than any batch (TEI issue 634)."""
        policy = self.policy or self.buckets.for_model(self.model.max_seq_length)
        budget = self.budget(max_tokens)
        return [(rows, length) for rows, length in policy.shapes(batch_size, budget) if rows * length <= budget]

    def compile_shapes(self, batch_size: int = 32, max_tokens: int | None = None,
                       show_progress_bar: bool = False) -> list[tuple[int, int]]:
        """Run every shape twice through the entry, from inputs of the bucket's token count: once with every row
        full, once with one row short (the masked path padded batches take); returns the shapes."""
        from tqdm.auto import tqdm

        shapes = self.shapes(batch_size, max_tokens)
        options = {"normalize_embeddings": True} if "normalize_embeddings" in self.signature.parameters else {}
        for rows, length in tqdm(shapes, desc=f"st_npu warm-up on {self.model.device}", unit="shape",
                                 disable=not show_progress_bar):
            full, short = self.sample_input(length), self.sample_input(max(length - 1, 3))
            self.entry([full] * rows, batch_size=rows, show_progress_bar=False)
            # normalize_embeddings runs in the forward, on the padded batch: its shapes compile here too.
            self.entry([full] * (rows - 1) + [short], batch_size=rows, show_progress_bar=False, **options)
        return shapes

    def capture(self, batch_size: int = 32, max_tokens: int | None = None) -> int:
        """Capture the graph of every shape :meth:`shapes` gives, where graph mode is on; how many the model has."""
        if self.graphs is None:
            return 0
        return self.graphs.capture(self.shapes(batch_size, max_tokens), self.sample_features)

    def sample_input(self, tokens: int) -> Any:
        """An input (a text, or a pair for a reranker) that the model's tokenizer turns into ``tokens`` ids, or the
        longest one below that it can reach (the padded shape is what a warm-up needs)."""
        def make(words: int) -> Any:
            text = " ".join(["hello"] * words)
            return (text, "hello") if self.kind.entry == "predict" else text

        def measure(words: int) -> int:
            features = type(self.model).preprocess(self.model, [make(words)])
            return int(features["attention_mask"].sum()) if "attention_mask" in features else \
                features["input_ids"].shape[1]

        base = measure(0)
        per_word = max(measure(1) - base, 1)
        words = max((tokens - base) // per_word, 0)
        while words > 0 and measure(words) > tokens:
            words -= 1
        return make(words)

    def sample_features(self, rows: int, tokens: int) -> Any:
        """Stock-tokenized host features padded to exactly (rows, tokens), the last row short (the masked path)."""
        full, short = self.sample_input(tokens), self.sample_input(min(tokens, 3))
        batch = [full] * (rows - 1) + [short] if rows > 1 else [full]
        features = type(self.model).preprocess(self.model, batch)
        # A bucket below the shortest input the model can be given (a chat template's own tokens) still gets its
        # shape: the sample is cut to it, keeping the end a left-padded model reads.
        cut = slice(-tokens, None) if self.left else slice(0, tokens)
        for key, value in features.items():
            if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[1] > tokens:
                features[key] = value[:, cut]
        return pad(features, (rows, tokens), self.pad_id, self.left)[0]

    def __getstate__(self) -> dict[str, Any]:  # a pool pickles the model, and with it its engine
        return {key: value for key, value in self.__dict__.items() if key != "signature"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.signature = _compat.entry_signature(self.model, self.kind)
