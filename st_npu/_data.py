"""Declarative data shipped with the package (``configs/`` in the repository, ``st_npu/configs`` when installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(relative_path: str) -> Any:
    """Read one JSON file from the configs folder; a missing or malformed file names itself."""
    path = CONFIG_DIR / relative_path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"st_npu data file {path} is missing; the installation is incomplete.") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"st_npu data file {path} is not valid JSON: {exc}") from None
