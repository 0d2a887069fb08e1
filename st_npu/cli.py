"""The ``st-npu`` command (also ``python -m st_npu``): embed, embed-corpus, info, verify, bench, serve,
bench-serve, run.

This is the top of the package: it parses arguments and hands each command to its own module; nothing imports
it. Nothing here imports torch at module level: where torch_npu is installed without CANN, ``import torch``
fails, and the command must still explain that instead of printing a traceback. Exit codes: 0 success, 1 a
check failed (``verify``, ``info`` with problems), 2 a usage or load error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from st_npu import __version__
from st_npu.errors import UsageError
from st_npu.inputs import DEFAULT_TEXT_FIELD, STDIN
from st_npu.options import add_model_arguments, load_model, positive_int
from st_npu.outputs import STDOUT, check_embeddings_output, write_embeddings

PREVIEW_ROWS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-npu", description="sentence-transformers embeddings on Ascend NPUs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed texts and print or save the vectors")
    add_model_arguments(embed)
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to embed (repeatable)")
    source.add_argument("--batch-file", "--batch_file", dest="batch_file",
                        help=f"a UTF-8 file, one text per line (a blank line is the text \"\"), a .jsonl file "
                             f"(see --text-field), or {STDIN} for standard input")
    embed.add_argument("--text-field", default=DEFAULT_TEXT_FIELD,
                       help=f"the field holding the text in a .jsonl --batch-file (default {DEFAULT_TEXT_FIELD})")
    embed.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=32,
                       help="texts per batch (default 32)")
    embed.add_argument("--prompt-name", help="a prompt of the model, e.g. qa_query for llm-embedder queries")
    embed.add_argument("--output", help=f"write the embeddings to a .npy or .jsonl file (atomically), or {STDOUT} "
                                        f"for JSON lines on standard output")

    info = commands.add_parser("info", help="versions, devices and what is broken, with the fix")
    info.add_argument("--json", action="store_true", help="print the report as JSON")

    verify = commands.add_parser("verify", help="accuracy on the device against a CPU float32 reference")
    add_model_arguments(verify)
    verify.add_argument("--texts", help="extra texts, one per line, added to the built-in 23")
    verify.add_argument("--threshold", type=float, default=1.0, help="largest error rate in percent (default 1.0)")
    verify.add_argument("--json", dest="json_path", help="also write the report to this JSON file")
    reference = verify.add_mutually_exclusive_group()
    reference.add_argument("--save-reference", help="compute the CPU reference and save it to this file")
    reference.add_argument("--reference", help="use a saved CPU reference instead of computing one")

    bench = commands.add_parser("bench", help="st_npu against stock sentence-transformers, side by side")
    add_model_arguments(bench)
    bench.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated (default 1,8,32,128)")
    bench.add_argument("--workload", choices=("seed", "mixed"), default="mixed",
                       help="seed: the 23 sentences of the seed port; mixed: zh/en texts of 1 to 512 tokens")
    bench.add_argument("--limit", type=positive_int, help="use only the first N texts of the workload")
    bench.add_argument("--repeats", type=positive_int, default=1, help="timed passes per batch size and model")
    bench.add_argument("--graphs", choices=("on", "off"), default="on",
                       help="st_npu's graph mode where the device can capture (default on; emulated npu, Ascend, CUDA)")
    bench.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    bench.add_argument("--plot", help="draw throughput, speed-up and latency against batch size to this PNG "
                                      "(needs matplotlib)")

    corpus = commands.add_parser("embed-corpus", help="embed a whole corpus into resumable Parquet shards, on every "
                                                      "local NPU or a Ray cluster")
    add_model_arguments(corpus)
    corpus.add_argument("input", help="a .txt, .jsonl, .parquet, .csv or .tsv file, a folder of them, or a glob")
    corpus.add_argument("--output", required=True, help="folder for part-NNNNN.parquet shards and manifest.json")
    corpus.add_argument("--devices", help="comma-separated, e.g. npu:0,npu:3 (default: every local NPU)")
    corpus.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="field or column of the text")
    corpus.add_argument("--id-field", help="field or column of each row's id (default: the row number)")
    corpus.add_argument("--keep", help="comma-separated fields or columns to copy beside each embedding")
    corpus.add_argument("--output-dtype", choices=("float32", "float16"), default="float32",
                        help="type of the stored vectors (default float32; the model runs in --dtype)")
    corpus.add_argument("--prompt-name", help="a prompt of the model, e.g. qa_key for llm-embedder passages")
    corpus.add_argument("--max-seq-length", type=positive_int, help="truncate texts to this many tokens")
    corpus.add_argument("--batch-size", type=positive_int, default=32, help="texts per batch (default 32)")
    corpus.add_argument("--shard-size", type=positive_int, default=10_000, help="rows per shard (default 10000)")
    corpus.add_argument("--skip-empty", action="store_true", help="do not embed blank texts (their rows keep "
                                                                  "their numbers)")
    corpus.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                        help="skip: write each bad row's position and reason to rejects.jsonl and go on")
    corpus.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    corpus.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: worker processes on this machine's devices (default); ray: Ray Data actors")
    corpus.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto); default: a local Ray")
    corpus.add_argument("--ray-actors", type=positive_int, help="model actors (default: one per NPU of the cluster)")
    corpus.add_argument("--progress", action="store_true", help="show the progress bar also when not on a terminal")
    corpus.add_argument("--summary-json", help="also write the summary to this JSON file")

    serve = commands.add_parser("serve", help="an embedding server (OpenAI and TEI APIs) that batches requests")
    add_serve_arguments(serve)
    serve.add_argument("--api-key", help="refuse requests without 'Authorization: Bearer <key>' (401)")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    serve.add_argument("--one-at-a-time", action="store_true",
                       help="no batching: one encode per request, one request at a time per device (a baseline)")

    bench_serve = commands.add_parser("bench-serve", help="load test: the batching server against one-at-a-time")
    add_serve_arguments(bench_serve)
    bench_serve.add_argument("--clients", default="1,16,64", help="concurrent clients per run (default 1,16,64)")
    bench_serve.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    bench_serve.add_argument("--max-requests", type=positive_int, default=20000,
                             help="stop a run after this many requests (default 20000)")
    bench_serve.add_argument("--json", dest="json_path", help="also write the results to this JSON file")

    run = commands.add_parser("run", help="run an unchanged Python script (or -m module) with the NPU patch active")
    run.add_argument("-m", dest="module", help="run a library module as a script, like python -m")
    run.add_argument("script", nargs="?", help="the script to run (none with -m)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batching options of ``serve``, shared with ``bench-serve`` (which starts servers)."""
    add_model_arguments(parser)
    parser.add_argument("--devices", help="one model per device, e.g. npu:0,npu:1 (instead of --device)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=16384,
                        help="padded tokens (rows x bucket length) per batch (default 16384)")
    parser.add_argument("--max-batch-size", type=positive_int, default=64, help="texts per batch (default 64)")
    parser.add_argument("--max-client-batch-size", type=positive_int, default=32,
                        help="texts per request; more is refused with 413 (default 32)")
    parser.add_argument("--max-concurrent-requests", type=positive_int, default=512,
                        help="requests queued or computing; more are refused with 429 (default 512)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and not (args.module or args.script):
        parser.error("st-npu run needs a script or -m module")
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
        if args.command == "embed-corpus":
            from st_npu.corpus.job import run_embed_corpus

            return run_embed_corpus(args)
        if args.command in ("serve", "bench-serve"):
            from st_npu.serve import run_bench_serve, run_serve

            return run_serve(args) if args.command == "serve" else run_bench_serve(args)
        from st_npu.patching import run_module, run_script

        if args.module:  # argparse took the module's first argument for the script
            return run_module(args.module, [args.script, *args.args] if args.script else args.args)
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
        return True  # raised by `import torch` itself when torch_npu cannot load (see st_npu.hints)
    from st_npu.devices import DeviceError

    return isinstance(exc, DeviceError)


def run_info(args: argparse.Namespace) -> int:
    from st_npu import doctor

    report = doctor.collect()
    print(json.dumps(report, indent=2) if args.json else doctor.format_report(report))
    return 1 if report["problems"] else 0


def run_embed(args: argparse.Namespace) -> int:
    problem = check_embeddings_output(args.output)
    if problem:
        raise UsageError(problem)
    from st_npu.inputs import read_texts

    texts = args.text if args.text else read_texts(args.batch_file, args.text_field)
    model = load_model(args)
    embeddings = embed_texts(model, texts, args.batch_size, args.prompt_name, show_progress_bar=bool(args.batch_file))
    # With --output -, standard output carries the vectors; the summary goes to standard error.
    summary = sys.stderr if args.output == STDOUT else sys.stdout
    print(f"model:     {args.model}", file=summary)
    print(f"device:    {model.device} ({next(model.parameters()).dtype})", file=summary)
    print(f"count:     {len(texts)}", file=summary)
    print(f"dimension: {embeddings.shape[1]}", file=summary)
    for text, vector in list(zip(texts, embeddings))[:PREVIEW_ROWS]:
        preview = ", ".join(f"{value:+.4f}" for value in vector[:5])
        print(f"  {text[:40]!r:<44} [{preview}, ...]", file=summary)
    if args.output:
        write_embeddings(args.output, texts, embeddings)
        if args.output != STDOUT:
            print(f"wrote {args.output}", file=summary)
    return 0


def embed_texts(model: object, texts: list[str], batch_size: int, prompt_name: str | None,
                show_progress_bar: bool) -> object:
    """An (n, dimension) float array, also for n = 0 (stock returns a 1-D empty array then)."""
    import numpy as np

    from st_npu import _compat

    embeddings = model.encode(texts, batch_size=batch_size, prompt_name=prompt_name,
                              show_progress_bar=show_progress_bar, convert_to_numpy=True)
    return np.asarray(embeddings).reshape(len(texts), _compat.embedding_dimension(model))
