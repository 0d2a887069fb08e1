"""Errors that the ``st-npu`` commands report as a usage problem (exit code 2) rather than a crash."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments or input found before any work: exit code 2."""
