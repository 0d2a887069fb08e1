"""Tokenising at admission: each request's texts are counted, cut to the model's limit, or refused, once.

Runs on a pool of its own threads (``--tokenization-workers``), off the event loop and off the device workers,
each thread with its own copy of the tokenizer. A long text is never tokenised whole: only a prefix (or, cutting
from the left, a suffix) a few times the limit long is, grown only while it holds fewer tokens than the limit, so
a 10 MB text costs about what a text at the limit costs. A text is cut on a token boundary of the original string
(from the tokenizer's offsets), so the rows that reach the device are the texts as the client sent them, shortened.
"""

from __future__ import annotations

import copy
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 8  # first guess of the characters the limit's tokens take; grown when a text has fewer tokens


class TooLong(ValueError):
    """A text over the limit, sent with truncation off."""


@dataclass
class Admitted:
    rows: list[Any]  # texts (or (query, text) pairs), cut to the limit
    encodings: list[list[int]]  # each row's token ids, special tokens included, as the model sees them
    tokens: int  # tokens computed (the sum of the encodings' lengths)
    tokenized: int  # texts tokenised to admit them (a rerank request's query once)


class Tokenization:
    """``workers`` threads, each with its own copy of ``tokenizer``."""

    def __init__(self, tokenizer: Any, workers: int) -> None:
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(workers):
            self._free.put(copy.deepcopy(tokenizer))
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="st_npu-tokenize")
        self.vocab_size = len(tokenizer)
        self.single, self.pair = _templates(tokenizer)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def run(self, function: Any, *args: Any) -> Any:
        """``function(tokenizer, *args)`` on a free tokenizer copy (call it in the pool)."""
        tokenizer = self._free.get()
        try:
            return function(tokenizer, *args)
        finally:
            self._free.put(tokenizer)

    # --- embedder rows --------------------------------------------------------------------------------------------

    def texts(self, tokenizer: Any, texts: list[str], prompt: str, limit: int, truncate: bool, left: bool,
              field: str) -> Admitted:
        """Each text with ``prompt`` before it, as ``encode`` will see it, cut to ``limit`` tokens or refused."""
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        room = limit - sum(map(len, self.single)) - len(prompt_ids)
        if room < 1:
            raise TooLong(f"the prompt takes {len(prompt_ids)} tokens, leaving none of the model's {limit} for the text")
        rows, encodings = [], []
        for index, text in enumerate(texts):
            ids, kept = _bounded(tokenizer, text, room, left)
            if kept is None:
                pass
            elif not truncate:
                raise TooLong(f"{field}[{index}] has more than {limit} tokens (the model's maximum input length, "
                              f"prompt and special tokens included); shorten it or send truncate: true")
            else:
                text = kept
            rows.append(text)
            encodings.append(_with_specials(self.single, prompt_ids + ids))
        return Admitted(rows, encodings, sum(map(len, encodings)), len(texts))

    def ids(self, tokenizer: Any, sequences: list[list[int]], limit: int, truncate: bool, left: bool,
            field: str) -> Admitted:
        """Token-id inputs, taken as the model input itself (special tokens as sent); decoded for the device call."""
        rows, encodings = [], []
        for index, ids in enumerate(sequences):
            bad = next((i for i, token in enumerate(ids) if not 0 <= token < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{field}[{index}][{bad}] = {ids[bad]} is not a token id of this model's "
                                 f"vocabulary (0 to {self.vocab_size - 1})")
            if len(ids) > limit:
                if not truncate:
                    raise TooLong(f"{field}[{index}] has {len(ids)} tokens, more than the model's maximum input "
                                  f"length {limit}; shorten it or send truncate: true")
                ids = ids[-limit:] if left else ids[:limit]
            rows.append(tokenizer.decode(ids, skip_special_tokens=True))
            encodings.append(list(ids))
        return Admitted(rows, encodings, sum(map(len, encodings)), len(sequences))

    # --- reranker rows --------------------------------------------------------------------------------------------

    def pairs(self, tokenizer: Any, pairs: list[tuple[str, str]], limit: int, truncate: bool, left: bool,
              field: str) -> Admitted:
        """(query, text) pairs cut to ``limit`` tokens as the tokenizer's longest-first truncation cuts them; a
        query shared by many pairs (a rerank request's) is tokenised once."""
        room = limit - sum(map(len, self.pair))
        firsts: dict[str, tuple[list[int], str | None]] = {}
        rows, encodings = [], []
        for index, (query, text) in enumerate(pairs):
            if query not in firsts:
                firsts[query] = _bounded(tokenizer, query, room, left)
            query_ids, query_cut = firsts[query]
            ids, cut = _bounded(tokenizer, text, room, left)
            first, second = _longest_first(len(query_ids), len(ids), room)
            over = (first, second) != (len(query_ids), len(ids)) or query_cut is not None or cut is not None
            if over and not truncate:
                raise TooLong(f"{field}[{index}] and its query together have more than {limit} tokens (the "
                              f"model's maximum input length); shorten them or send truncate: true")
            q_text, q_ids = _keep(tokenizer, query if query_cut is None else query_cut, query_ids, first, left)
            d_text, d_ids = _keep(tokenizer, text if cut is None else cut, ids, second, left)
            rows.append((q_text, d_text))
            encodings.append(_with_specials(self.pair, q_ids, d_ids))
        return Admitted(rows, encodings, sum(map(len, encodings)), len(pairs) + len(firsts))


def _templates(tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    """The special tokens the tokenizer puts around one text and between two: ([before, after],
    [before, between, after]), read off one short tokenisation each (e.g. BERT's [CLS] a [SEP] b [SEP])."""
    first = tokenizer("a", add_special_tokens=False)["input_ids"]
    second = tokenizer("b", add_special_tokens=False)["input_ids"]
    single = tokenizer("a")["input_ids"]
    pair = tokenizer("a", "b")["input_ids"]
    at = _find(single, first, 0)
    a, b = _find(pair, first, 0), _find(pair, second, _find(pair, first, 0) + len(first))
    return ([single[:at], single[at + len(first):]],
            [pair[:a], pair[a + len(first):b], pair[b + len(second):]])


def _find(sequence: list[int], part: list[int], start: int) -> int:
    for index in range(start, len(sequence) - len(part) + 1):
        if sequence[index : index + len(part)] == part:
            return index
    raise ValueError("the tokenizer's special-token template could not be read")


def _with_specials(template: list[list[int]], *parts: list[int]) -> list[int]:
    ids = list(template[0])
    for part, after in zip(parts, template[1:]):
        ids += part + after
    return ids


def _bounded(tokenizer: Any, text: str, room: int, left: bool) -> tuple[list[int], str | None]:
    """The ids of ``text`` cut to ``room`` tokens, and the cut text (None when the whole text fits).

    Tokenises a piece of the text, from the end it keeps, a few times ``room`` long, and grows it only while it
    holds too few tokens to decide; one token more than ``room`` is asked of a piece, since its last (first) token
    may be a word cut in two."""
    chars = max(room * CHARS_PER_TOKEN, 64)
    while True:
        whole = len(text) <= chars
        piece = text if whole else (text[-chars:] if left else text[:chars])
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if whole and len(ids) <= room:
            return ids, None
        if whole or len(ids) > room + 1:
            break
        chars *= 4
    shift = len(text) - len(piece) if left else 0
    if left:
        return ids[-room:], text[shift + offsets[-room][0]:]
    return ids[:room], text[: offsets[room - 1][1]]


def _longest_first(first: int, second: int, room: int) -> tuple[int, int]:
    """Lengths after removing tokens one at a time from the longer sequence (the second on a tie) until both fit."""
    excess = first + second - room
    if excess <= 0:
        return first, second
    gap = abs(first - second)
    if excess <= gap:
        return (first - excess, second) if first > second else (first, second - excess)
    shorter = min(first, second)
    rest = excess - gap  # both at `shorter` now: the second loses the first of each two tokens
    return shorter - rest // 2, shorter - rest + rest // 2


def _keep(tokenizer: Any, text: str, ids: list[int], count: int, left: bool) -> tuple[str, list[int]]:
    """``text`` and ``ids`` shortened to ``count`` tokens (a second, cheap tokenisation of an already cut text)."""
    if count >= len(ids):
        return text, ids
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoded["offset_mapping"]
    if left:
        start = offsets[len(offsets) - count][0] if count else len(text)
        return text[start:], ids[len(ids) - count:]
    return text[: offsets[count - 1][1] if count else 0], ids[:count]
