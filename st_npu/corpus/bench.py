"""Corpus-job figures, in one run on one CPU: rows/s of the Ray engine on two emulated NPUs, of the local engine on
two emulated NPUs and of a plain ``model.encode`` loop on one; then the Ray driver's peak memory (RSS) and each
actor's model loads on 20,000 and 200,000 short texts, to show the driver does not grow with the corpus.

    python -m st_npu.testing.fixtures /tmp/c-tiny --tiny
    python -m st_npu.corpus.bench --model /tmp/c-tiny

Every run is a fresh process on the same CPU: the emulated NPUs run on that CPU too, so the throughput rows show
the engines' overhead, not a speed-up. The memory runs give the Ray actors no NPU (they embed on the CPU, which
is faster than the emulator): the driver's memory is what they measure. A job's peak RSS is its driver
process's own high-water mark (``VmHWM``), not that of Ray's processes or actors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from st_npu.runtime.devices import cpu_name

WORDS = ("retrieval passage query index vector shard corpus model device memory stream resume ascend npu "
         "embedding batch token sentence search answer").split()
SETTINGS = ["--max-seq-length", "32", "--batch-size", "32"]

# The job's driver: starts a Ray of its own ("local": never one already running) on loopback, with two emulated
# NPUs when BENCH_NPUS is 2, else CPU actors; runs `st-npu embed-corpus`; leaves its own peak RSS beside the summary.
RAY_DRIVER = """
import os, runpy, sys, ray
npus = int(os.environ.pop("BENCH_NPUS"))
env = {name: os.environ[name] for name in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
if npus:
    env["ST_NPU_EMULATE"] = str(npus)
ray.init(address="local", num_cpus=2, resources={"NPU": npus}, include_dashboard=False, log_to_driver=False,
         _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
ray.data.DataContext.get_current().enable_progress_bars = False
sys.argv[0] = "st-npu"
try:
    runpy.run_module("st_npu", run_name="__main__")
finally:
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    open(os.environ["BENCH_RSS"], "w").write(peak.split()[1])
"""

# A plain loop: one model on one device, model.encode over the corpus a shard at a time, timed from the load.
PLAIN_LOOP = """
import json, sys, time
started = time.perf_counter()
from st_npu import SentenceTransformer
model_path, corpus, device, output = sys.argv[1:]
model = SentenceTransformer(model_path, device=device)
model.max_seq_length = 32
model.warmup(32)
texts = open(corpus, encoding="utf-8").read().splitlines()
for first in range(0, len(texts), 1000):
    model.encode(texts[first:first + 1000], batch_size=32)
seconds = time.perf_counter() - started
json.dump({"rows_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 2)}, open(output, "w"))
"""


def write_corpus(path: Path, rows: int) -> Path:
    """``rows`` short texts (2 to 12 words), the same for every run."""
    import random

    generator = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(" ".join(generator.choices(WORDS, k=generator.randint(2, 12))) + "\n")
    return path


def _run(command: list[str], env: dict[str, str], name: str) -> None:
    result = subprocess.run(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr.decode(errors='replace')[-3000:]}")


def run_job(model: str, corpus: Path, work: Path, name: str, extra: list[str], env: dict[str, str],
            ray_npus: int | None = None) -> dict:
    """One ``st-npu embed-corpus`` process (a Ray driver when ``ray_npus`` is given): its summary, peak RSS."""
    summary_path, rss_path = work / f"{name}.json", work / f"{name}.rss"
    launcher = ["-c", RAY_DRIVER] if ray_npus is not None else ["-m", "st_npu"]
    command = [sys.executable, *launcher, "embed-corpus", str(corpus), "--model", model, "--output",
               str(work / name), "--overwrite", "--summary-json", str(summary_path), *SETTINGS, *extra]
    _run(command, {**env, "BENCH_NPUS": str(ray_npus or 0), "BENCH_RSS": str(rss_path)}, name)
    summary = json.loads(summary_path.read_text())
    if rss_path.is_file():
        summary["peak_rss_mib"] = round(int(rss_path.read_text()) / 1024, 1)  # kB in /proc
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (python -m st_npu.testing.fixtures DIR --tiny)")
    parser.add_argument("--throughput-rows", type=int, default=20_000, help="rows for the rows/s runs (default 20000)")
    parser.add_argument("--memory-rows", default="20000,200000", help="corpus sizes for the Ray driver's peak RSS")
    parser.add_argument("--part", choices=("all", "throughput", "memory"), default="all", help="which table to print")
    args = parser.parse_args(argv)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="st-npu-corpus-bench-") as folder:
        work = Path(folder)
        print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; tiny BERT, batch 32, max_seq_length 32")
        if args.part != "memory":
            _throughput(args, work, env)
        if args.part != "throughput":
            _memory(args, work, env)


def _throughput(args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    corpus = write_corpus(work / "throughput.txt", args.throughput_rows)
    emulate = {**env, "ST_NPU_EMULATE": "2"}
    print(f"\n{args.throughput_rows:,} short texts, shards of 2,000 rows; times include loading and warming each "
          f"model, Ray's leave out starting Ray\n")
    print("| run | rows/s | time (s) | per device or actor |\n|---|---|---|---|")
    started = time.perf_counter()
    # Torch's default threads (one per core) and one thread, as each of the engines' two workers gets here.
    for threads, label in ((None, "torch's default threads"), ("1", "1 torch thread")):
        _run([sys.executable, "-c", PLAIN_LOOP, args.model, str(corpus), "npu:0", str(work / "plain.json")],
             {**emulate, **({"OMP_NUM_THREADS": threads} if threads else {})}, "plain loop")
        plain = json.loads((work / "plain.json").read_text())
        print(f"| plain `model.encode` loop, one emulated npu, {label} | {plain['rows_per_s']} | {plain['seconds']} "
              f"| - |")
    for label, extra, npus in (("local engine, two emulated NPUs", ["--devices", "npu:0,npu:1"], None),
                               ("Ray engine, two emulated NPUs", ["--engine", "ray"], 2)):
        summary = run_job(args.model, corpus, work, label.split()[0], [*extra, "--shard-size", "2000"], emulate, npus)
        per_device = "; ".join(f"{device} {figures['rows_per_s']}" for device, figures in summary["devices"].items())
        print(f"| {label} | {summary['rows_per_s']} | {summary['seconds']} | {per_device} |")
    print(f"\n(throughput runs: {time.perf_counter() - started:.0f} s)")


def _memory(args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    print("\n| texts (Ray, up to 2 CPU actors, shards of 10,000) | driver peak RSS (MiB) | ratio to the first | "
          "model loads per actor | rows/s |\n|---|---|---|---|---|")
    first = None
    for rows in map(int, args.memory_rows.split(",")):
        corpus = write_corpus(work / f"memory-{rows}.txt", rows)
        summary = run_job(args.model, corpus, work, f"memory-{rows}", ["--engine", "ray", "--ray-actors", "2"], env, 0)
        first = first or summary["peak_rss_mib"]
        loads = sorted(actor["model_loads"] for actor in summary["actors"].values())
        print(f"| {rows:,} | {summary['peak_rss_mib']} | {summary['peak_rss_mib'] / first:.2f}x | "
              f"{', '.join(map(str, loads))} | {summary['rows_per_s']} |")


if __name__ == "__main__":
    main()
