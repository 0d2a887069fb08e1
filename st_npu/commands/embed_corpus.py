"""``st-npu embed-corpus``: embed a whole corpus into resumable Parquet shards, on every local NPU or a Ray
cluster."""

from __future__ import annotations

import argparse

from st_npu.files.inputs import DEFAULT_TEXT_FIELD
from st_npu.commands.options import add_budget_argument, add_model_arguments, positive_int

HELP = "embed a whole corpus into resumable Parquet shards, on every local NPU or a Ray cluster"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("input", help="a .txt, .jsonl, .parquet, .csv or .tsv file, a folder of them, or a glob; a "
                                      "path or a URI (s3://bucket/prefix, gs://, hdfs://, file://)")
    parser.add_argument("--output", required=True, help="folder (path or URI) for part-NNNNN.parquet shards and "
                                                        "_manifest.json")
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="an option of the object store, for input and output URIs (repeatable), e.g. "
                             "endpoint_override=obs.cn-north-4.myhuaweicloud.com for Huawei OBS or MinIO; "
                             "credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    parser.add_argument("--devices", help="comma-separated, e.g. npu:0,npu:3 (default: every local NPU)")
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="field or column of the text")
    parser.add_argument("--id-field", help="field or column of each row's id (default: the row number)")
    parser.add_argument("--keep", help="comma-separated fields or columns to copy beside each embedding")
    parser.add_argument("--output-dtype", choices=("float32", "float16", "int8", "uint8", "binary", "ubinary"),
                        default="float32", help="type of the stored vectors (default float32; the model runs in "
                                                "--dtype); int8/uint8 use one set of ranges for the whole job, "
                                                "binary/ubinary pack the signs 8 to a byte")
    parser.add_argument("--truncate-dim", type=positive_int, help="keep the first N dimensions (Matryoshka models)")
    parser.add_argument("--int8-ranges", help="a .npy file of shape (2, dimension), minima then maxima, for int8/uint8 "
                                              "(default: the ranges of the input's first 1000 rows)")
    parser.add_argument("--prompt-name", help="a prompt of the model, e.g. qa_key for llm-embedder passages")
    parser.add_argument("--max-seq-length", type=positive_int, help="truncate texts to this many tokens")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="texts per batch (default 32)")
    add_budget_argument(parser)
    parser.add_argument("--shard-size", type=positive_int, default=10_000, help="rows per shard (default 10000)")
    parser.add_argument("--skip-empty", action="store_true", help="do not embed blank texts (their rows keep "
                                                                  "their numbers)")
    parser.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                        help="skip: write each bad row's position and reason to _rejects.jsonl and go on")
    parser.add_argument("--on-duplicate-id", choices=("error", "keep"), default="error",
                        help="an --id-field value given twice stops the job naming both rows (default), or is kept")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: worker processes on this machine's devices (default); ray: Ray Data actors")
    parser.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto); default: a local Ray")
    parser.add_argument("--ray-actors", type=positive_int, help="model actors (default: one per NPU of the cluster)")
    parser.add_argument("--progress", action="store_true", help="show the progress bar also when not on a terminal")
    parser.add_argument("--summary-json", help="also write the summary to this JSON file")


def run(args: argparse.Namespace) -> int:
    from st_npu.corpus.job import run_embed_corpus

    return run_embed_corpus(args)
