"""The house rules that code review would otherwise have to catch: the command module on top, no import circles,
and one module that touches sentence-transformers' internals."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "st_npu"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Each module's st_npu imports, at any depth (a lazy import inside a function counts too)."""
    modules = {_module_name(path) for path in PACKAGE.rglob("*.py")}
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("st_npu"):
                # `from package import submodule` imports the submodule, not (only) the package's __init__.
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
                targets |= submodules or {node.module}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("st_npu")}
        graph[_module_name(path)] = targets & modules
    return graph


def test_nothing_imports_the_command_module():
    importers = sorted(name for name, targets in _imports().items() if "st_npu.cli" in targets)
    assert importers == ["st_npu.__main__"]


def test_no_import_circles():
    graph = _imports()
    graph["st_npu"] = set()  # the package's lazy __getattr__ names its modules only as strings

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(target == goal or (target not in seen and not seen.add(target) and reaches(target, goal, seen))
                   for target in graph.get(start, ()))

    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert circles == []


def test_only_compat_reaches_into_sentence_transformers_internals():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("sentence_transformers."):
                offenders.append(f"{path.name}: from {module}")
    assert offenders == []
