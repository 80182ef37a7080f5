"""Process-wide MindSpore settings, per device. Here, in the lowest layer, because the kernel tools (kernels.tune,
kernels.pyboost) need them as much as the model does (cogvlm2.runtime re-exports).

CPU (measured here, DESIGN.md): PyNative with blocking launches (each sync ~50 us instead of ~0.7 ms) and op
threads = cores. Ascend: the device and its id only (launches stay asynchronous; MindSpore's default precision mode
there, must_keep_origin_dtype, already keeps every op in its inputs' dtype); nothing measured on CPU applies there.
"""
from __future__ import annotations

import os

from kernels.device import Device, device_from_env, select_device

_configured: Device | None = None


def configure_mindspore(device: str | None = None) -> Device:
    """Sets MindSpore up for `device` ('auto', 'cpu', 'ascend'; default: kernels.device.device_from_env) once per
    process and returns the Device; a later call naming another device is an error (MindSpore cannot switch)."""
    global _configured
    chosen = select_device(device or device_from_env())
    if _configured is not None:
        if device is not None and chosen != _configured:
            raise RuntimeError(f"MindSpore already runs on {_configured.describe()} in this process; "
                               f"device={device!r} needs a new process")
        return _configured
    import mindspore
    if chosen.target == "ascend":
        _configure_ascend(mindspore, chosen)
    else:
        _configure_cpu(mindspore)
    _configured = chosen
    return chosen


def configured_device() -> Device | None:
    return _configured


def _configure_cpu(mindspore) -> None:
    mindspore.set_device("CPU")
    mindspore.runtime.launch_blocking()
    threads = int(os.environ.get("COGVLM2_THREADS", os.cpu_count() or 1))
    mindspore.device_context.cpu.op_tuning.threads_num(threads)


def _configure_ascend(mindspore, device: Device) -> None:
    mindspore.set_device("Ascend", device.device_id)
