"""Errors that the ``st-npu`` commands report as a usage problem (exit code 2, one line) rather than a crash."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments or input found before any work: exit code 2."""


class InvalidValueError(UsageError, ValueError):
    """A bad argument value where a Python caller expects ``ValueError`` (as stock raises, or as it always did)."""
