"""The ``st-npu`` command (also ``python -m st_npu``): embed, info, verify, bench, run.

Nothing here imports torch at module level: where torch_npu is installed without CANN, ``import torch`` fails,
and the command must still explain that instead of printing a traceback. Exit codes: 0 success, 1 a check
failed (``verify``, ``info`` with problems), 2 a usage or load error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from st_npu.doctor import explain_torch_npu_failure
from st_npu.folder import DEFAULT_MODEL  # folder.py imports no torch, as this module must not

OUTPUT_SUFFIXES = (".npy", ".jsonl")


class UsageError(Exception):
    """Bad arguments or input found before any work: exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-npu", description="sentence-transformers embeddings on Ascend NPUs")
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed texts and print or save the vectors")
    _model_arguments(embed)
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to embed (repeatable)")
    source.add_argument("--batch-file", "--batch_file", dest="batch_file", help="a UTF-8 file, one text per line")
    embed.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=32)
    embed.add_argument("--prompt-name", help="a prompt of the model, e.g. qa_query for llm-embedder queries")
    embed.add_argument("--output", help="write the embeddings to a .npy or .jsonl file (atomically)")

    info = commands.add_parser("info", help="versions, devices and what is broken, with the fix")
    info.add_argument("--json", action="store_true", help="print the report as JSON")

    verify = commands.add_parser("verify", help="accuracy on the device against a CPU float32 reference")
    _model_arguments(verify)
    verify.add_argument("--texts", help="extra texts, one per line, added to the built-in 23")
    verify.add_argument("--threshold", type=float, default=1.0, help="largest error rate in percent (default 1.0)")
    verify.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    reference = verify.add_mutually_exclusive_group()
    reference.add_argument("--save-reference", help="compute the CPU reference and save it to this file")
    reference.add_argument("--reference", help="use a saved CPU reference instead of computing one")

    bench = commands.add_parser("bench", help="st_npu against stock sentence-transformers, side by side")
    _model_arguments(bench)
    bench.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated (default 1,8,32,128)")
    bench.add_argument("--workload", choices=("seed", "mixed"), default="mixed")
    bench.add_argument("--limit", type=_positive_int, help="use only the first N texts of the workload")
    bench.add_argument("--repeats", type=_positive_int, default=1, help="timed passes per batch size and model")
    bench.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    bench.add_argument("--plot", help="draw throughput against batch size to this PNG (needs matplotlib)")

    run = commands.add_parser("run", help="run an unchanged Python script with the NPU patch active")
    run.add_argument("script", help="the script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="auto (default), npu, npu:N, cpu, cuda:N")
    parser.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return run_info(args)
        if args.command == "embed":
            return run_embed(args)
        if args.command == "verify":
            from st_npu.verify import run_verify

            return run_verify(args)
        if args.command == "bench":
            from st_npu.bench import run_bench

            return run_bench(args)
        from st_npu.patching import run_script

        return run_script(args.script, args.args)
    except KeyboardInterrupt:
        print("st-npu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _is_user_error(exc):
            print(f"st-npu {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


def _is_user_error(exc: Exception) -> bool:
    if isinstance(exc, (UsageError, ValueError, TypeError, OSError)):
        return True
    if isinstance(exc, RuntimeError) and ("torch_npu" in str(exc) or "backend extension" in str(exc)):
        return True  # raised by `import torch` itself when torch_npu cannot load (see st_npu.doctor)
    from st_npu.devices import DeviceError

    return isinstance(exc, DeviceError)


def run_info(args: argparse.Namespace) -> int:
    from st_npu import doctor

    report = doctor.collect()
    print(json.dumps(report, indent=2) if args.json else doctor.format_report(report))
    return 1 if report["problems"] else 0


def load_model(args: argparse.Namespace) -> Any:
    """The model of ``--model/--device/--dtype``; import errors of a broken torch_npu become a clear message."""
    try:
        import st_npu
    except RuntimeError as exc:
        raise RuntimeError(explain_torch_npu_failure(exc)) from exc
    return st_npu.SentenceTransformer(args.model, device=args.device, dtype=args.dtype)


def run_embed(args: argparse.Namespace) -> int:
    if args.output and Path(args.output).suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--output {args.output}: use a .npy or .jsonl file")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise UsageError(f"--output {args.output}: folder {Path(args.output).resolve().parent} does not exist")
    from st_npu.workloads import load_texts

    texts = args.text if args.text else load_texts(args.batch_file)
    model = load_model(args)
    embeddings = model.encode(texts, batch_size=args.batch_size, prompt_name=args.prompt_name,
                              show_progress_bar=bool(args.batch_file), convert_to_numpy=True)
    print(f"model:     {args.model}")
    print(f"device:    {model.device} ({next(model.parameters()).dtype})")
    print(f"count:     {len(texts)}")
    print(f"dimension: {embeddings.shape[1] if len(texts) else model.get_sentence_embedding_dimension()}")
    for text, vector in list(zip(texts, embeddings))[:3]:
        preview = ", ".join(f"{value:+.4f}" for value in vector[:5])
        print(f"  {text[:40]!r:<44} [{preview}, ...]")
    if args.output:
        write_embeddings(Path(args.output), texts, embeddings)
        print(f"wrote {args.output}")
    return 0


def write_embeddings(path: Path, texts: list[str], embeddings: Any) -> None:
    """Save as .npy or .jsonl; a crash or Ctrl-C leaves the previous file (or none), never half of one."""
    with atomic_file(path) as handle:
        if path.suffix == ".npy":
            import numpy as np

            np.save(handle, embeddings)
        else:
            for text, vector in zip(texts, embeddings):
                line = json.dumps({"text": text, "embedding": [float(value) for value in vector]}, ensure_ascii=False)
                handle.write(line.encode("utf-8") + b"\n")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Any]:
    """A temporary file beside ``path``, renamed over it only once fully written."""
    handle = tempfile.NamedTemporaryFile(dir=path.resolve().parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            yield handle
        os.chmod(handle.name, 0o666 & ~_umask())  # temporary files are private; the result should not be
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
