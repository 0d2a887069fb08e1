"""One lock per tokenizer, for everything in st_npu that tokenizes through a model's tokenizer.

A fast tokenizer sets truncation and padding on its one Rust object before each call: two threads tokenizing
through it at once cut each other's texts to the other's length (a 256-token query, a 512-token key) or fail with
"Already borrowed". The locks live outside the models, which must stay picklable for multi-process pools.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_guard = threading.Lock()


def tokenizer_lock(tokenizer: Any) -> threading.Lock:
    with _guard:
        return _locks.setdefault(tokenizer, threading.Lock())
