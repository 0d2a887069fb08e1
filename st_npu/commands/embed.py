"""``st-npu embed``: embed texts and print or save the vectors."""

from __future__ import annotations

import argparse
import sys

from st_npu.errors import UsageError
from st_npu.files.inputs import DEFAULT_TEXT_FIELD, STDIN
from st_npu.files.outputs import STDOUT, check_embeddings_output, write_embeddings
from st_npu.commands.options import add_budget_argument, add_model_arguments, load_model, positive_int

HELP = "embed texts and print or save the vectors"
PREVIEW_ROWS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to embed (repeatable)")
    source.add_argument("--batch-file", "--batch_file", dest="batch_file",
                        help=f"a UTF-8 file, one text per line (a blank line is the text \"\"), a .jsonl file "
                             f"(see --text-field), or {STDIN} for standard input")
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD,
                        help=f"the field holding the text in a .jsonl --batch-file (default {DEFAULT_TEXT_FIELD})")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=32,
                        help="texts per batch (default 32)")
    add_budget_argument(parser)
    parser.add_argument("--prompt-name", help="a prompt of the model, e.g. qa_query for llm-embedder queries")
    parser.add_argument("--output", help=f"write the embeddings to a .npy or .jsonl file (atomically), or {STDOUT} "
                                         f"for JSON lines on standard output")


def run(args: argparse.Namespace) -> int:
    problem = check_embeddings_output(args.output)
    if problem:
        raise UsageError(problem)
    from st_npu.files.inputs import read_texts

    texts = args.text if args.text else read_texts(args.batch_file, args.text_field)
    model = load_model(args, max_batch_tokens=args.max_batch_tokens)
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
