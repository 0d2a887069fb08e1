"""One module per ``st-npu`` command. Each has ``HELP`` (its line in ``st-npu --help``), ``add_arguments(parser)``
(its options, which it owns) and ``run(args) -> int`` (its exit code). Importing one must stay cheap: no torch at
module level, so that a broken torch_npu is explained, not shown as a traceback.

``COMMANDS`` maps each command name to its module, in the order ``st-npu --help`` lists them; :mod:`.options`
holds what several commands share (model options, output checks, the early device check).
"""

COMMANDS = {
    "embed": "embed",
    "embed-corpus": "embed_corpus",
    "info": "info",
    "verify": "verify",
    "bench": "bench",
    "serve": "serve",
    "bench-serve": "bench_serve",
    "run": "run",
}
