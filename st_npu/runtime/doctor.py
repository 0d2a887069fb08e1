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
import warnings
from pathlib import Path
from typing import Any

from st_npu.runtime import emulation
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
# What each optional extra of st-npu enables; its packages come from the installed st-npu's own metadata.
EXTRAS = {
    "npu": "the real Ascend NPU (torch_npu)",
    "serve": "st-npu serve and st-npu bench-serve (HTTP server, metrics, benchmark client)",
    "corpus": "st-npu embed-corpus: .parquet/.csv/.tsv input and Parquet shards",
    "ray": "st-npu embed-corpus --engine ray (Ray Data over many machines)",
    "bench": "st-npu bench's mixed workload (Chinese texts) and --plot",
}
# The fix for each variable that the emulated npu reads; a problem's message starts with its variable's name.
EMULATOR_FIXES = {
    "ST_NPU_EMULATE_MEMORY_LIMIT": "set ST_NPU_EMULATE_MEMORY_LIMIT to a byte count (e.g. 1073741824) or unset it",
    "ST_NPU_EMULATE": "set ST_NPU_EMULATE to a device count (e.g. ST_NPU_EMULATE=2), or unset it for no emulated npu",
    "ASCEND_RT_VISIBLE_DEVICES": "list existing device indexes once each (e.g. ASCEND_RT_VISIBLE_DEVICES=0,1), or "
                                 "unset it to see every device",
}
# The stores embed-corpus reaches through pyarrow: each scheme, pyarrow's class for it, what it covers.
FILESYSTEMS = {
    "s3": ("S3FileSystem", "s3:// (AWS S3, Huawei OBS, MinIO, any S3-compatible store)"),
    "gs": ("GcsFileSystem", "gs:// (Google Cloud Storage)"),
    "hdfs": ("HadoopFileSystem", "hdfs:// (needs Hadoop's libhdfs and a JVM at run time: HADOOP_HOME, JAVA_HOME)"),
}
REQUIREMENT = re.compile(r"^([A-Za-z0-9._-]+)[^;]*;.*extra\s*==\s*['\"]([\w-]+)['\"]")



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
    report["extras"] = extras()
    report["filesystems"] = filesystems()
    problems = report["problems"]
    emulator_problem = emulation.environment_problem()
    if emulator_problem:
        problems.append(emulator_variable_problem(emulator_problem))
    try:
        with warnings.catch_warnings():  # the emulator's autoload warns of the problem just reported
            if emulator_problem:
                warnings.filterwarnings("ignore", "the emulated npu is not installed", RuntimeWarning)
            import torch
    except Exception as exc:  # torch_npu's autoload raises RuntimeError from inside `import torch`
        problems.append(_torch_import_problem(exc))
        return report
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


def emulator_variable_problem(problem: str) -> dict[str, str]:
    """A problem with the emulated npu's variables, with the fix for the variable it names."""
    variable = next(name for name in (*EMULATOR_FIXES, "") if problem.startswith(name))
    fix = EMULATOR_FIXES.get(variable, "unset ST_NPU_EMULATE for no emulated npu")
    return {"problem": f"the emulated npu cannot start: {problem}", "fix": fix}


def extras() -> dict[str, dict[str, Any]]:
    """Each optional extra of st-npu: what it enables, its packages, and which of them are missing here."""
    try:
        requirements = importlib.metadata.requires("st-npu") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that pip never installed
        requirements = []
    packages: dict[str, list[str]] = {name: [] for name in EXTRAS}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match and match.group(2) in packages:
            packages[match.group(2)].append(match.group(1))
    return {name: {"enables": EXTRAS[name], "packages": packages[name],
                   "missing": [package for package in packages[name] if installed_version(package) is None]}
            for name in EXTRAS if packages[name]}


def filesystems() -> dict[str, str]:
    """Which URI schemes this install can read and write corpus jobs on (besides paths and file://): those
    this pyarrow was built with."""
    try:
        import pyarrow.fs
    except ImportError:
        return {scheme: 'no: pyarrow is missing (pip install "st-npu[corpus]")' for scheme in FILESYSTEMS}
    reachable = {}
    for scheme, (name, covers) in FILESYSTEMS.items():
        try:
            getattr(pyarrow.fs, name)  # pyarrow raises ImportError for a filesystem its build left out
            reachable[scheme] = f"yes: {covers}"
        except ImportError:
            reachable[scheme] = "no: this pyarrow build has no support for it"
    return reachable


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
    if report["extras"]:
        lines.append('extras                 pip install "st-npu[EXTRA]" adds one')
        for name, extra in report["extras"].items():
            state = f"missing {', '.join(extra['missing'])}" if extra["missing"] else "installed"
            lines.append(f"  {name:<8} {state:<30} {extra['enables']}")
    if report.get("filesystems"):
        lines.append("filesystems            for embed-corpus input and --output, besides paths and file://")
        lines += [f"  {scheme:<20} {state}" for scheme, state in report["filesystems"].items()]
    if report["environment"]:
        lines.append("environment")
        lines += [f"  {name}={value}" for name, value in report["environment"].items()]
    lines += ["hints"] + [f"  - {hint}" for hint in report["hints"]] if report["hints"] else []
    lines.append("problems" if report["problems"] else "problems               none")
    for item in report["problems"]:
        lines += [f"  - {item['problem']}", f"    fix: {item['fix']}"]
    return "\n".join(lines)
