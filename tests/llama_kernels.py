"""llama-cpp-python's high-level `Llama` (the tests' reference and the llama.cpp server) on
the same kernels as our engine: without repacked weight buffers where llama.cpp reports AMX,
whose matmul segfaults (see `services.model.llama_engine.extra_buffers_safe`). `Llama()` has
no option for it, so its default model parameters are wrapped.

`python -m tests.llama_kernels ARGS...` runs `python -m llama_cpp.server ARGS...` that way.
"""

from __future__ import annotations

import runpy
import sys
from typing import Callable


def use_engine_kernels() -> Callable[[], None]:
    """Make every `Llama()` loaded after this use the engine's kernels; returns the undo."""
    import llama_cpp.llama as high_level

    from services.model.llama_engine import extra_buffers_safe

    lib = high_level.llama_cpp
    defaults = lib.llama_model_default_params

    def engine_params():
        params = defaults()
        params.use_extra_bufts = extra_buffers_safe(lib.llama_print_system_info().decode())
        return params

    lib.llama_model_default_params = engine_params

    def undo() -> None:
        lib.llama_model_default_params = defaults
    return undo


if __name__ == "__main__":
    use_engine_kernels()
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
