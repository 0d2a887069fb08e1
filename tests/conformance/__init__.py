"""Conformance with stock sentence-transformers (issue 17); see doors.py."""
