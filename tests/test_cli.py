"""The st-npu command: embed and info, run as a user runs them (subprocesses, emulated npu where needed)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, needs_emulator, run_cli, run_python

import st_npu
from st_npu import cli
from st_npu.commands import info as info_command
from st_npu.errors import InvalidValueError, UsageError
from st_npu.files import outputs
from st_npu.files.inputs import InputError
from st_npu.loading.folder import ModelFolderError, ModelNotFoundError
from st_npu.runtime.devices import DeviceError


@needs_emulator
def test_embed_on_an_npu_in_a_subprocess(tiny_cls, tmp_path):
    output = tmp_path / "out.npy"
    result = run_cli("embed", "--model", str(tiny_cls), "--text", "Hello world", "--text", "你好", "--device", "npu:2",
                     "--output", str(output), env={"ST_NPU_EMULATE": "8"})
    assert result.returncode == 0, result.stderr
    assert "device:    npu:2" in result.stdout and "dimension: 32" in result.stdout and "count:     2" in result.stdout
    expected = st_npu.SentenceTransformer(tiny_cls, device="cpu").encode(["Hello world", "你好"])
    assert np.abs(np.load(output) - expected).max() <= 1e-6
    assert oct(output.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_embed_batch_file_keeps_one_row_per_line(tiny_cls, tmp_path, capsys):
    """A blank line is the text "": row i of the output is line i of the file, in .jsonl and .npy alike."""
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\n\nsecond line\n\n第三行\n", encoding="utf-8")
    lines = ["first line", "", "second line", "", "第三行"]
    for output in (tmp_path / "out.jsonl", tmp_path / "out.npy"):
        code = cli.main(["embed", "--model", str(tiny_cls), "--batch_file", str(texts), "--batch_size", "2",
                         "--device", "cpu", "--output", str(output)])
        assert code == 0
        assert "count:     5" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["text"] for row in rows] == lines
    matrix = np.load(tmp_path / "out.npy")
    expected = st_npu.SentenceTransformer(str(tiny_cls), device="cpu").encode(lines, convert_to_numpy=True)
    assert matrix.shape == (5, 32)
    np.testing.assert_allclose(matrix, expected, atol=1e-6)
    np.testing.assert_allclose(matrix, [row["embedding"] for row in rows], atol=1e-6)


def test_embed_reads_jsonl_by_field(tiny_cls, tmp_path, capsys):
    texts = tmp_path / "docs.jsonl"
    texts.write_text('{"id": 7, "body": "alpha"}\n{"id": 8, "body": "beta"}\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert cli.main(["embed", "--model", str(tiny_cls), "--batch-file", str(texts), "--text-field", "body",
                     "--device", "cpu", "--output", str(output)]) == 0
    assert [json.loads(line)["text"] for line in output.read_text().splitlines()] == ["alpha", "beta"]
    assert cli.main(["embed", "--model", str(tiny_cls), "--batch-file", str(texts), "--device", "cpu"]) == 2
    assert "line 1 has no field 'text'" in capsys.readouterr().err


def test_embed_an_empty_file_gives_zero_rows_of_the_model_dimension(tiny_cls, tmp_path, recwarn):
    texts = tmp_path / "empty.txt"
    texts.write_bytes(b"")
    output = tmp_path / "out.npy"
    assert cli.main(["embed", "--model", str(tiny_cls), "--batch-file", str(texts), "--device", "cpu",
                     "--output", str(output)]) == 0
    assert np.load(output).shape == (0, 32)
    ours = [w for w in recwarn if issubclass(w.category, FutureWarning) and "st_npu" in w.filename]
    assert ours == [], [str(w.message) for w in ours]


def test_embed_from_stdin_to_stdout_as_json_lines(tiny_cls):
    result = subprocess.run([sys.executable, "-m", "st_npu", "embed", "--model", str(tiny_cls), "--device", "cpu",
                             "--batch-file", "-", "--output", "-"], input="one\n\nthree\n", capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["one", "", "three"] and len(rows[0]["embedding"]) == 32
    assert "count:     3" in result.stderr  # the summary stays off the data stream


def test_embed_refuses_bad_output_before_loading(tiny_cls, tmp_path, capsys):
    assert cli.main(["embed", "--model", str(tiny_cls), "--text", "x", "--output", str(tmp_path / "out.csv")]) == 2
    assert ".npy or .jsonl file, or - for JSON lines" in capsys.readouterr().err
    missing = tmp_path / "no" / "out.npy"
    assert cli.main(["embed", "--model", str(tiny_cls), "--text", "x", "--output", str(missing)]) == 2


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    output = tmp_path / "out.npy"
    output.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with outputs.atomic_file(output) as handle:
            handle.write(b"half")
            raise KeyboardInterrupt
    assert output.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_embed_names_a_missing_model_folder(tmp_path, capsys):
    assert cli.main(["embed", "--model", str(tmp_path / "nothing"), "--text", "x", "--device", "cpu"]) == 2
    assert "nothing does not exist" in capsys.readouterr().err


@needs_emulator
def test_info_reports_versions_and_emulated_npus():
    result = run_cli("info", "--json", env={"ST_NPU_EMULATE": "8"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["devices"]["npu"] == {"count": 8, "names": ["Ascend910B3 (emulated)"] * 8, "emulated": True}
    assert report["versions"]["sentence-transformers"] and report["problems"] == []
    assert report["hints"] == []  # TASK_QUEUE_ENABLE is an Ascend runtime switch: no use to an emulated npu
    text = run_cli("info", env={"ST_NPU_EMULATE": "2"}).stdout
    assert "sentence-transformers" in text and "problems               none" in text
    assert "npu                  2 (emulated)  2 x Ascend910B3 (emulated)" in text


def test_version_and_help_on_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"st-npu {st_npu.__version__}"
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"st-npu {name}: option {action.option_strings or action.dest} has no help text"


def test_a_bad_count_reads_as_must_be_a_positive_integer(capsys):
    with pytest.raises(SystemExit):
        cli.main(["embed", "--text", "x", "--batch-size", "zero"])
    err = capsys.readouterr().err
    assert "must be a positive integer, got 'zero'" in err and "_positive_int" not in err


def console_script(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    """``st-npu ARGS`` as its console script runs it: unlike ``python -m st_npu``, the current folder is not on
    ``sys.path``."""
    code = "import sys; del sys.path[0]; from st_npu.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, input=stdin, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_run_a_module_of_the_current_folder_like_python_dash_m(tmp_path):
    package = tmp_path / "mytool"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import sys, sentence_transformers\n"
        "patched = hasattr(sentence_transformers.SentenceTransformer.__init__, '__wrapped__')\n"
        "print('args', sys.argv[1:], 'patched', patched)\n"
        "sys.exit(3)\n")
    result = console_script("run", "-m", "mytool", "a", "--b", "-m", "x", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "args ['a', '--b', '-m', 'x'] patched True" in result.stdout


def test_run_passes_every_later_option_to_the_script_or_module(tmp_path):
    result = console_script("run", "-m", "json.tool", "--indent", "1", cwd=tmp_path, stdin='{"a": [1]}')
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{\n "a": [\n  1\n ]\n}\n'
    (tmp_path / "show.py").write_text("import sys\nprint(sys.argv[1:])\n")
    result = console_script("run", "show.py", "--flag", "-h", "-m", "x", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "['--flag', '-h', '-m', 'x']\n", result.stderr


@pytest.mark.parametrize("args, message", [
    (["-m", "no_such_module"], "no module named 'no_such_module' (looked in"),
    (["-m", "no_such_package.sub"], "no module named 'no_such_package.sub'"),
    (["-m", "bare_package"], "'bare_package' is a package without a __main__ module"),
    (["-m"], "-m needs a module name"),
    ([], "needs a script or -m module"),
    (["missing.py"], "no such script: missing.py"),
])
def test_run_reports_what_python_cannot_run_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "bare_package").mkdir()
    (tmp_path / "bare_package" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    path = sys.path[:]
    try:
        assert cli.main(["run", *args]) == 2
    finally:
        sys.modules.pop("bare_package", None)
    assert sys.path == path
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("st-npu run: error: ") and message in lines[0]


def test_task_queue_hint_only_for_real_npus(monkeypatch):
    from st_npu.runtime import doctor

    monkeypatch.delenv("TASK_QUEUE_ENABLE", raising=False)
    monkeypatch.setattr(doctor, "_npu_devices", lambda problems, versions: {"count": 2, "names": ["Ascend910B3"] * 2,
                                                                            "emulated": False})
    assert any("TASK_QUEUE_ENABLE=2" in hint for hint in doctor.collect()["hints"])
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    assert doctor.collect()["hints"] == []


# --- errors: a usage problem is one line (exit 2); anything else is a bug and shows its traceback (exit 1) ------


@pytest.mark.parametrize("error", [ValueError("a bug"), TypeError("a bug"), OSError("a bug"), KeyError("a bug")])
def test_an_unexpected_error_in_a_command_shows_its_traceback(monkeypatch, capsys, error):
    def broken(args):
        raise error

    monkeypatch.setattr(info_command, "run", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and f"{type(error).__name__}: " in err and "in broken" in err


@pytest.mark.parametrize("error", [UsageError("a usage problem"), InvalidValueError("a bad value"),
                                   InputError("texts.txt: line 3 is not valid UTF-8"),
                                   ModelFolderError("modules.json is missing"), ModelNotFoundError("no such model"),
                                   DeviceError("npu:9 does not exist")])
def test_user_errors_are_one_line(monkeypatch, capsys, error):
    def refuse(args):
        raise error

    monkeypatch.setattr(info_command, "run", refuse)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == f"st-npu info: error: {error}\n"


def test_bad_values_stay_value_errors_for_library_callers(tiny_cls):
    """Drop-in: the library raised ValueError for these before they became usage errors, and still does."""
    with pytest.raises(ValueError, match="Unsupported dtype"):
        st_npu.SentenceTransformer(str(tiny_cls), device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="No known-model spec"):
        st_npu.SentenceTransformer(str(tiny_cls), device="cpu", spec="no/such-model")


# --- a device that cannot exist is refused before the heavy imports --------------------------------------------


@pytest.mark.parametrize("env, message", [
    ({"ST_NPU_EMULATE": ""}, "An NPU was requested but torch_npu is not installed. Install it with pip install"),
    ({"ST_NPU_EMULATE": "abc"}, "--device npu: the emulated npu cannot start: ST_NPU_EMULATE must be an integer"),
    ({"ST_NPU_EMULATE": "2", "ASCEND_RT_VISIBLE_DEVICES": "0,7"}, "ASCEND_RT_VISIBLE_DEVICES='0,7': device 7"),
])
def test_npu_without_torch_npu_is_refused_before_torch_is_imported(tiny_cls, env, message):
    """Shown by what is imported, not by timing: torch, transformers and sentence-transformers never load."""
    try:
        pytest.skip(f"torch-npu {importlib.metadata.version('torch-npu')} is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    code = ("import sys\nfrom st_npu import cli\n"
            f"code = cli.main(['embed', '--model', {str(tiny_cls)!r}, '--text', 'hi', '--device', 'npu'])\n"
            "print(code, sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))\n")
    result = run_python(code, env=env)
    assert result.stdout == "2 []\n", result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# --- st-npu info --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, variable, fix", [
    ({"ST_NPU_EMULATE": "abc"}, "ST_NPU_EMULATE must be an integer >= 1, got 'abc'", "set ST_NPU_EMULATE to a device"),
    ({"ST_NPU_EMULATE": "2", "ST_NPU_EMULATE_MEMORY_LIMIT": "lots"}, "ST_NPU_EMULATE_MEMORY_LIMIT must be an integer",
     "set ST_NPU_EMULATE_MEMORY_LIMIT to a byte count"),
    ({"ST_NPU_EMULATE": "2", "ASCEND_RT_VISIBLE_DEVICES": "0,x"}, "ASCEND_RT_VISIBLE_DEVICES='0,x': 'x' is not a",
     "list existing device indexes once each"),
])
def test_info_names_a_bad_emulator_variable_and_its_fix(env, variable, fix):
    result = run_cli("info", env=env)
    assert result.returncode == 1 and result.stderr == ""  # no traceback, no warning repeating the problem
    problems = result.stdout[result.stdout.index("\nproblems\n"):]
    assert f"  - the emulated npu cannot start: {variable}" in problems and f"    fix: {fix}" in problems


def test_info_lists_each_extra_what_it_enables_and_what_is_missing(monkeypatch):
    from st_npu.runtime import doctor

    requirements = importlib.metadata.requires("st-npu")
    extras = doctor.extras()
    assert set(extras) == set(doctor.EXTRAS)
    assert "pyarrow" in extras["corpus"]["packages"] and {"fastapi", "uvicorn"} <= set(extras["serve"]["packages"])
    for extra in extras.values():
        assert all(any(r.startswith(package) for r in requirements) for package in extra["packages"])
    installed = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: None if name == "pyarrow" else installed(name))
    report = doctor.collect()
    assert report["extras"]["corpus"]["missing"] == ["pyarrow"] and "pyarrow" in report["extras"]["ray"]["missing"]
    lines = doctor.format_report(report).splitlines()
    corpus = next(line for line in lines if line.startswith("  corpus "))
    assert "missing pyarrow" in corpus and "st-npu embed-corpus" in corpus
