"""Process-wide MindSpore settings: defined in kernels/runtime.py (the kernel tools need them too), re-exported here
for the model and the engine."""
from __future__ import annotations

from kernels.runtime import configure_mindspore

__all__ = ["configure_mindspore"]
