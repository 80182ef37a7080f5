"""Process-wide MindSpore settings for this CPU (see DESIGN.md: measured facts). Here, in the lowest layer, because
the kernel tools (kernels.tune, kernels.pyboost) need them as much as the model does (cogvlm2.runtime re-exports)."""
from __future__ import annotations

import os

_configured = False


def configure_mindspore() -> None:
    """PyNative with blocking launches (each sync ~50 us instead of ~0.7 ms) and op threads = cores."""
    global _configured
    if _configured:
        return
    import mindspore
    mindspore.set_device("CPU")
    mindspore.runtime.launch_blocking()
    threads = int(os.environ.get("COGVLM2_THREADS", os.cpu_count() or 1))
    mindspore.device_context.cpu.op_tuning.threads_num(threads)
    _configured = True
