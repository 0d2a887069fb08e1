"""Errors that the ``st-npu`` commands report as a usage problem (exit code 2, one line) rather than a crash."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments or input found before any work: exit code 2."""


class InvalidValueError(UsageError, ValueError):
    """A bad argument value where a Python caller expects ``ValueError`` (as stock raises, or as it always did)."""


class NonFiniteError(FloatingPointError):
    """A call produced NaN or infinite embeddings or scores (a float16 overflow, mostly): raised instead of
    returning them. ``indices`` are the call's input positions with such rows; ``dtype`` is the model's."""

    def __init__(self, indices: list[int], count: int, dtype: object, entry: str = "encode") -> None:
        self.indices, self.count, self.dtype, self.entry = list(indices), count, dtype, entry
        shown = ", ".join(str(index) for index in self.indices[:10]) + (", ..." if len(self.indices) > 10 else "")
        name = str(dtype).removeprefix("torch.")
        fix = ("float16 overflows past 65,504: load the model in bfloat16 (same range as float32) or float32, "
               "e.g. dtype=\"bfloat16\" or --dtype bfloat16" if name == "float16" else
               "load the model in float32 (dtype=\"float32\", --dtype float32) or check its weights")
        super().__init__(f"{entry} produced NaN or infinite values for {len(self.indices)} of {count} inputs "
                         f"(indices {shown}) with the model in {name}: {fix}")

    def __reduce__(self) -> tuple:  # a corpus worker sends it to its parent through a queue
        return type(self), (self.indices, self.count, self.dtype, self.entry)
