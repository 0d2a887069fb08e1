"""The house rules that code review would otherwise have to catch: layers that import only downwards, the command
module on top, no import circles, one module that touches sentence-transformers' internals and one that touches the
emulated npu.

The layers, bottom to top; a module may import its own layer and the layers below it:

    0 base        errors, _compat, emulator/
    1 files       loading/ (model folders, configs, fingerprints), files/ (texts in, vectors out)
    2 runtime     runtime/ (devices, pools, hints, emulation, diagnosis)
    3 engine      engine/ (static shapes, grouping, graphs, attention, overlap, per-call context)
    4 doors       model, cross_encoder, accelerated, patching, llm_embedder, options, and the package itself
    5 services    serve/, corpus/
    6 evaluation  evaluation/ (verify, bench, bench-serve, measures, workloads)
    7 commands    commands/ (one module per st-npu command)
    8 top         cli, __main__
testing/ (fixtures for tests) sits outside: nothing in st_npu imports it.
"""

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


LAYERS = {
    "st_npu.errors": 0, "st_npu._compat": 0, "st_npu.emulator": 0,
    "st_npu.loading": 1, "st_npu.files": 1,
    "st_npu.runtime": 2,
    "st_npu.engine": 3,
    "st_npu.model": 4, "st_npu.cross_encoder": 4, "st_npu.accelerated": 4, "st_npu.patching": 4, "st_npu.llm_embedder": 4, "st_npu.options": 4,
    "st_npu": 4,
    "st_npu.serve": 5, "st_npu.corpus": 5,
    "st_npu.evaluation": 6,
    "st_npu.commands": 7,
    "st_npu.cli": 8, "st_npu.__main__": 8,
}


def _layer(module: str) -> int | None:
    """The layer of a module: that of the longest LAYERS entry it is or lies inside (the package's own entry names
    only its ``__init__``)."""
    owners = [name for name in LAYERS if module == name or (name != "st_npu" and module.startswith(name + "."))]
    return LAYERS[max(owners, key=len)] if owners else None


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in _imports() if _layer(name) is None and not name.startswith("st_npu.testing"))
    assert unplaced == []


def test_layers_import_only_downwards():
    upward = sorted(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
                    for name, targets in _imports().items() if not name.startswith("st_npu.testing")
                    for target in targets if (_layer(target) or 0) > (_layer(name) or 0))
    assert upward == []


def test_nothing_in_the_package_imports_testing():
    importers = sorted(name for name, targets in _imports().items() if not name.startswith("st_npu.testing")
                       and any(target.startswith("st_npu.testing") for target in targets))
    assert importers == []


def test_only_the_emulation_module_reaches_the_emulator():
    importers = sorted(name for name, targets in _imports().items() if not name.startswith("st_npu.emulator")
                       and any(target.startswith("st_npu.emulator") for target in targets))
    assert importers == ["st_npu.runtime.emulation"]


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
