"""nanok2: Kimi K2 Thinking, small enough to read and to run on a laptop CPU.

The public entry points; heavy modules (torch, the engine) are imported on first use.
"""
from nanok2.config import PRESETS, ModelArgs
from nanok2.errors import CheckpointError, ConfigError, NanoK2Error

__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `import nanok2` stays cheap for the CLI and for modules that never touch torch
    if name in ("Transformer", "build_model"):
        from nanok2 import model
        return getattr(model, name)
    if name in ("load_model", "save_model"):
        from nanok2 import checkpoint
        return getattr(checkpoint, name)
    if name == "Engine":
        from nanok2.engine import Engine
        return Engine
    if name == "SamplingParams":
        from nanok2.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'nanok2' has no attribute {name!r}")
