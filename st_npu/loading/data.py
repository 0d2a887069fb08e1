"""Declarative data shipped with the package (``configs/`` in the repository, ``st_npu/configs`` when installed),
and the one JSON reader that both it and model folders use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def read_json(path: Path, error: type[Exception] = ValueError) -> Any:
    """Parse one JSON file; a missing, malformed or non-UTF-8 file raises ``error`` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing.") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def load_config(relative_path: str) -> Any:
    """One file of the configs folder (a problem there means a broken installation)."""
    return read_json(CONFIG_DIR / relative_path)
