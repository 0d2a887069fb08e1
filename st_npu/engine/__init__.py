"""The engine: one way of accelerating any sentence-transformers model, whichever door it comes through.

``accelerate(model, Options(...))`` installs it (:mod:`.core` says what it does and how); ``engine_of(model)`` finds
it again; ``Engine.undo()`` removes it.
"""

from st_npu.engine.core import Engine, Options, accelerate, check_budget, engine_of
from st_npu.engine.static_shapes import ShapePolicy

__all__ = ["Engine", "Options", "ShapePolicy", "accelerate", "check_budget", "engine_of"]
