"""One probe of the engine's features, run on a model built through each door (see tests/test_doors.py).

Imported by the test for the class and patch doors, and run by ``st-npu run`` as a script for the third door: the
same code measures each, so the doors can only agree if the engine gives each the same behaviour.
"""

from __future__ import annotations

import json
import sys

import torch

from st_npu.engine import engine_of
from st_npu.runtime import emulation

TEXTS = ["a short one", "two words", "a somewhat longer text that takes more tokens than the others do here",
         "x", "中文 文本", "hello world again and again", "the last text of this probe", "ok"]


def probe(model) -> dict:
    engine = engine_of(model)
    result = {"device": str(model.device), "engine": engine is not None}
    seen = []
    hook = model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]["attention_mask"].shape))

    def oom(module, args):  # a device that cannot hold more than two rows
        if args[0]["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("injected: NPU out of memory")

    injected = model[0].register_forward_pre_hook(oom)
    try:
        result["oom_rows"] = model.encode(TEXTS, batch_size=8).tolist()
    finally:
        injected.remove()
    seen.clear()
    model.encode(["word " * 400], prompt_name="qa_query")
    result["query_tokens"] = max(shape[-1] for shape in seen)
    hook.remove()
    engine.warmup(batch_size=4, show_progress_bar=False)
    emulation.reset_counters()
    result["rows"] = model.encode(TEXTS * 3, batch_size=4).tolist()
    counted = emulation.counters(model.device)
    result["compiles_after_warmup"] = counted.compiles
    result["launches_per_replay"] = counted.launches / max(counted.replays, 1)
    result["replays"] = counted.replays
    result["prefetch"] = engine.last_prefetch
    try:
        model.encode(["fine", 3])
    except Exception as exc:  # the input check's message and type, whichever door
        result["bad_input"] = [type(exc).__name__, str(exc)]
    return result


if __name__ == "__main__":  # the st-npu run door: a script that builds a stock model, as a framework would
    import sentence_transformers

    model = sentence_transformers.SentenceTransformer(sys.argv[1])
    print(json.dumps(probe(model)))
