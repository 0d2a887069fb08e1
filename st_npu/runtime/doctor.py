"""What is installed, what devices are seen, and what is broken with its fix (``st-npu info``).

This module must import without torch: where torch_npu is installed but CANN is not sourced, ``import torch``
itself fails (torch auto-loads torch_npu), and this is exactly where a user needs a diagnosis.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from st_npu.runtime.hints import CANN_HINT, INSTALL_HINT

# TORCH_DEVICE_BACKEND_AUTOLOAD=0 only lets `import torch` through: transformers still imports torch_npu as soon
# as it finds it installed, and fails the same way, so the CPU needs an environment without torch-npu.
NO_NPU_HINT = "pip uninstall torch-npu (or use a virtual environment without it)"

CANN_ENV_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
DEFAULT_CANN_HOME = Path("/usr/local/Ascend/ascend-toolkit/latest")
REPORTED_ENV = ("ASCEND_RT_VISIBLE_DEVICES", "TORCH_DEVICE_BACKEND_AUTOLOAD", "TASK_QUEUE_ENABLE", "LOCAL_RANK",
                "ST_NPU_EMULATE", "HF_ENDPOINT", "HF_HUB_OFFLINE")
PACKAGES = ("torch", "torch-npu", "sentence-transformers", "transformers", "tokenizers", "huggingface-hub", "st-npu")
# Probe run with autoload off: it shows why torch_npu itself fails once torch no longer hides it.
TORCH_NPU_PROBE = "import torch, torch_npu; print(torch.npu.device_count())"



def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cann_version() -> tuple[str | None, str]:
    """(version or None, where it was looked for) from the toolkit's install record."""
    homes = [Path(os.environ[var]) for var in CANN_ENV_VARS if os.environ.get(var)] + [DEFAULT_CANN_HOME]
    for home in homes:
        for record in sorted(home.glob("*/ascend_toolkit_install.info")) + [home / "version.cfg"]:
            if record.is_file():
                match = re.search(r"version=\[?([\w.]+)", record.read_text(errors="replace"))
                return (match.group(1) if match else "unknown"), str(home)
    return None, ", ".join(str(home) for home in homes)


def collect() -> dict[str, Any]:
    """The whole report as plain data; ``problems`` lists what is broken, each with its fix."""
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: installed_version(name) for name in PACKAGES},
        "environment": {name: os.environ[name] for name in REPORTED_ENV if name in os.environ},
        "devices": {},
        "problems": [],
        "hints": [],
    }
    version, where = cann_version()
    report["versions"]["CANN"] = version
    report["cann_searched"] = where
    problems = report["problems"]
    try:
        import torch
    except Exception as exc:  # torch_npu's autoload raises RuntimeError from inside `import torch`
        problems.append(_torch_import_problem(exc))
        return report
    _emulator_from_env(problems)
    report["devices"]["cpu"] = {"count": 1, "note": f"{os.cpu_count()} cores"}
    if torch.cuda.is_available():
        report["devices"]["cuda"] = {"count": torch.cuda.device_count(),
                                     "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    report["devices"]["npu"] = _npu_devices(problems, report["versions"])
    npu = report["devices"]["npu"]
    report["runtime"] = _npu_runtime() if npu["count"] else {}
    if npu["count"] and not npu.get("emulated") and os.environ.get("TASK_QUEUE_ENABLE") != "2":
        # Short-text embedding is host-bound on Ascend (the seed port: ~25 ms per 23-sentence call); level 2
        # lets the host queue operators ahead of the device.
        report["hints"].append("export TASK_QUEUE_ENABLE=2 before starting Python: encode is host-bound on NPU")
    return report


def _torch_import_problem(exc: BaseException) -> dict[str, str]:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "torch_npu" not in text:
        return {"problem": f"import torch fails: {text}", "fix": "reinstall torch: pip install torch"}
    probe = subprocess.run([sys.executable, "-c", TORCH_NPU_PROBE], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    detail = (probe.stderr.strip().splitlines() or [""])[-1]
    return {"problem": f"import torch fails because torch auto-loads torch_npu, which cannot start: {text} "
                       f"With autoload off, import torch_npu says: {detail}",
            "fix": f"{CANN_HINT}; or, to use torch on the CPU here, {NO_NPU_HINT}"}


def _emulator_from_env(problems: list[dict[str, str]]) -> None:
    from st_npu.runtime import emulation

    try:
        emulation.install_from_env()
    except (ValueError, RuntimeError) as exc:
        problems.append({"problem": f"ST_NPU_EMULATE: {exc}", "fix": "unset ST_NPU_EMULATE or set it to a device count"})


def _npu_runtime() -> dict[str, str]:
    """What decides host overhead on Ascend: operator compile mode, graph capture, the task queue level."""
    import torch

    from st_npu.runtime.devices import graph_capture_unavailable

    is_binary = getattr(torch.npu, "is_jit_compile_false", None)
    if is_binary is None:
        mode = "unknown (this torch_npu cannot say)"
    else:
        mode = ("binary kernels (jit_compile=False)" if is_binary() else
                "online compilation (jit_compile=True; binary kernels: torch_npu.npu.set_compile_mode(jit_compile=False))")
    reason = graph_capture_unavailable(torch.device("npu", 0))
    queue = os.environ.get("TASK_QUEUE_ENABLE")
    return {"compile mode": mode, "graph capture": "available" if reason is None else f"unavailable: {reason}",
            "task queue": f"TASK_QUEUE_ENABLE={queue}" if queue else "TASK_QUEUE_ENABLE unset (level 1, the default)"}


def _npu_devices(problems: list[dict[str, str]], versions: dict[str, str | None]) -> dict[str, Any]:
    import torch

    from st_npu.runtime.devices import DeviceError, load_torch_npu

    if versions["torch-npu"] is None and "torch_npu" not in sys.modules:
        return {"count": 0, "note": "torch_npu is not installed"}
    try:
        torch_npu = load_torch_npu()
    except DeviceError as exc:
        problem, _, _ = str(exc).partition(" Fix: ")
        problems.append({"problem": problem, "fix": CANN_HINT if "CANN" in problem else INSTALL_HINT.format(
            torch=torch.__version__.split("+")[0])})
        return {"count": 0, "note": "torch_npu failed to load"}
    count = torch.npu.device_count() if torch.npu.is_available() else 0
    if not count:
        problems.append({"problem": "torch_npu loaded but sees no NPU",
                         "fix": "check npu-smi info and ASCEND_RT_VISIBLE_DEVICES"})
    npu_torch = versions["torch-npu"]
    if npu_torch and versions["torch"] and npu_torch.split("+")[0].split(".post")[0] != versions["torch"].split("+")[0]:
        problems.append({"problem": f"torch-npu {npu_torch} does not match torch {versions['torch']}",
                         "fix": f"pip install torch-npu=={versions['torch'].split('+')[0]}"})
    return {"count": count, "names": [torch.npu.get_device_name(i) for i in range(count)],
            "emulated": bool(getattr(torch_npu, "__emulated__", False))}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"python                 {report['python']} ({report['platform']})"]
    lines += [f"{name:<22} {version or 'not installed'}" for name, version in report["versions"].items() if name != "CANN"]
    lines.append(f"{'CANN':<22} {report['versions']['CANN'] or 'not found (looked in ' + report['cann_searched'] + ')'}")
    lines.append("devices")
    for kind, info in report["devices"].items():
        names = info.get("names", [])
        # Eight NPUs of one chip read as "8 x Ascend910B3", not the name eight times.
        detail = ", ".join(f"{names.count(name)} x {name}" if names.count(name) > 1 else name
                           for name in dict.fromkeys(names)) or info.get("note", "")
        lines.append(f"  {kind:<20} {info['count']}{' (emulated)' if info.get('emulated') else ''}"
                     f"{'  ' + detail if detail else ''}")
    if not report["devices"]:
        lines.append("  (unknown: torch could not be imported)")
    if report.get("runtime"):
        lines.append("npu runtime")
        lines += [f"  {name:<20} {value}" for name, value in report["runtime"].items()]
    if report["environment"]:
        lines.append("environment")
        lines += [f"  {name}={value}" for name, value in report["environment"].items()]
    lines += ["hints"] + [f"  - {hint}" for hint in report["hints"]] if report["hints"] else []
    lines.append("problems" if report["problems"] else "problems               none")
    for item in report["problems"]:
        lines += [f"  - {item['problem']}", f"    fix: {item['fix']}"]
    return "\n".join(lines)
