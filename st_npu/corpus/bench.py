"""Corpus-job figures: rows/s on one device, on two emulated NPUs and on Ray with two emulated NPUs, and the
peak host memory (RSS) of a job on 20,000 and 200,000 short texts, to show it does not grow with the corpus.

    python -m st_npu.testing.fixtures /tmp/c-tiny --tiny
    python -m st_npu.corpus.bench --model /tmp/c-tiny

Every run is a fresh ``st-npu embed-corpus`` process on the same CPU: the emulated NPUs run on that CPU too,
so the throughput rows show the engines' overhead, not a speed-up. Peak RSS is the job process's own (one
device, in-process), read from the kernel when it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from st_npu.runtime.devices import cpu_name

WORDS = ("retrieval passage query index vector shard corpus model device memory stream resume ascend npu "
         "embedding batch token sentence search answer").split()


LOCAL_RAY_JOB = """
import os, runpy, sys, ray
ray.init(num_cpus=2, resources={"NPU": 2}, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
         runtime_env={"env_vars": {name: os.environ[name] for name in ("ST_NPU_EMULATE", "HF_HUB_OFFLINE")}})
sys.argv[0] = "st-npu"
runpy.run_module("st_npu", run_name="__main__")
"""


def write_corpus(path: Path, rows: int) -> Path:
    """``rows`` short texts (2 to 12 words), the same for every run."""
    import random

    generator = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(" ".join(generator.choices(WORDS, k=generator.randint(2, 12))) + "\n")
    return path


def run_job(model: str, corpus: Path, work: Path, name: str, extra: list[str], env: dict[str, str]) -> dict:
    """One ``st-npu embed-corpus`` process; its summary plus its peak RSS in MiB."""
    summary_path = work / f"{name}.json"
    # With --engine ray, the job process starts a local Ray (loopback) with two NPUs, emulated in each actor.
    launcher = ["-c", LOCAL_RAY_JOB] if "ray" in extra else ["-m", "st_npu"]
    command = [sys.executable, *launcher, "embed-corpus", str(corpus), "--model", model, "--output",
               str(work / name), "--overwrite", "--max-seq-length", "32", "--summary-json", str(summary_path), *extra]
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise RuntimeError(f"{name} failed:\n{stderr.decode(errors='replace')[-3000:]}")
    summary = json.loads(summary_path.read_text())
    summary["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # kilobytes on Linux
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (python -m st_npu.testing.fixtures DIR --tiny)")
    parser.add_argument("--throughput-rows", type=int, default=4000, help="rows for the rows/s runs (default 4000)")
    parser.add_argument("--memory-rows", default="20000,200000", help="corpus sizes for peak RSS")
    parser.add_argument("--part", choices=("all", "throughput", "memory"), default="all", help="which table to print")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray run (no st-npu[ray] installed)")
    args = parser.parse_args(argv)
    emulate = {"ST_NPU_EMULATE": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="st-npu-corpus-bench-") as folder:
        work = Path(folder)
        print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
        if args.part != "memory":
            _throughput(args, work, emulate)
        if args.part != "throughput":
            _memory(args, work, emulate)


def _throughput(args: argparse.Namespace, work: Path, emulate: dict[str, str]) -> None:
    corpus = write_corpus(work / "throughput.txt", args.throughput_rows)
    runs = [("one device (emulated npu:0)", ["--devices", "npu:0"]),
            ("two emulated NPUs (local engine)", ["--devices", "npu:0,npu:1"])]
    if not args.skip_ray:
        runs.append(("Ray, two emulated NPUs", ["--engine", "ray"]))
    print(f"{args.throughput_rows} short texts, batch 32, max_seq_length 32, shards of 1,000 rows; Ray's time "
          f"leaves out starting Ray\n")
    print("| run | rows/s | time (s, with start-up) |\n|---|---|---|")
    for index, (label, extra) in enumerate(runs):
        summary = run_job(args.model, corpus, work, f"run{index}", [*extra, "--shard-size", "1000"], emulate)
        device_rates = "; ".join(f"{device} {figures['rows_per_s']}" for device, figures in
                                 summary["devices"].items())
        print(f"| {label} | {summary['rows_per_s']} (per device: {device_rates}) | {summary['seconds']} |")


def _memory(args: argparse.Namespace, work: Path, emulate: dict[str, str]) -> None:
    print("\n| texts | peak RSS of the job (MiB) | ratio to the first |\n|---|---|---|")
    first = None
    for rows in map(int, args.memory_rows.split(",")):
        corpus = write_corpus(work / f"memory-{rows}.txt", rows)
        summary = run_job(args.model, corpus, work, f"memory-{rows}", ["--device", "cpu"], emulate)
        first = first or summary["peak_rss_mib"]
        print(f"| {rows:,} | {summary['peak_rss_mib']} | {summary['peak_rss_mib'] / first:.2f}x |")


if __name__ == "__main__":
    main()
