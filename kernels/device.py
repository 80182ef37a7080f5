"""Which device MindSpore runs on: `device` = "auto" | "cpu" | "ascend" -> a Device (target, device id, SoC).

- "auto": Ascend when MindSpore reports an NPU (its Ascend plugin loaded and at least one device), else CPU.
- "ascend": the same probe, and a DeviceUnavailableError naming what is missing when it finds no NPU.
- The device id is this process's local rank: msrun exports DEVICE_ID = local rank to each worker. Under
  ASCEND_RT_VISIBLE_DEVICES the runtime numbers the listed devices 0..n-1, so the id stays the local rank and the
  physical card is the rank's entry of that list.
- The SoC comes from kernels.sku (COGVLM2_SKU fakes it); it decides the dtype (cogvlm2/precision.py) and the
  kernel table (kernels/sku.py).
Also the environment a tensor-parallel launch gives its workers on each device (HCCL on Ascend).
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

from kernels.sku import ascend_family, detect_sku_info, family_of

DEVICES = ("auto", "cpu", "ascend")
DEVICE_ENV = "COGVLM2_DEVICE"  # the device a tensor-parallel worker uses (set by the driver)
VISIBLE_ENV = "ASCEND_RT_VISIBLE_DEVICES"
DEVICE_ID_ENV = "DEVICE_ID"  # msrun: the worker's local rank
NO_BF16_FAMILIES = ("310p",)  # SoCs whose vector and cube units have no bf16 (Ascend 310P)
# HCCL settings of a tensor-parallel launch on Ascend (docs/ascend.md, "Tensor parallelism on Ascend"): the connect
# timeout covers ranks that load a 19B shard at different speeds; a value the user exported wins. `import mindspore`
# itself sets HCCL_CONNECT_TIMEOUT=600 when unset (mindspore/context.py), so that value counts as unset.
HCCL_DEFAULTS = {"HCCL_CONNECT_TIMEOUT": "1800", "HCCL_EXEC_TIMEOUT": "1800"}
MINDSPORE_IMPORT_DEFAULTS = {"HCCL_CONNECT_TIMEOUT": "600"}

logger = logging.getLogger("cogvlm2.device")


class DeviceUnavailableError(RuntimeError):
    """device='ascend' on a host where MindSpore reports no NPU."""


@dataclass(frozen=True)
class NpuProbe:
    """What this host says about Ascend NPUs, as MindSpore sees them."""
    plugin_loaded: bool      # the installed MindSpore loaded its Ascend plugin (needs CANN's libraries)
    plugin_error: str = ""   # why it did not, in MindSpore's words
    device_count: int = 0

    @property
    def available(self) -> bool:
        return self.plugin_loaded and self.device_count > 0

    def missing(self) -> str:
        if not self.plugin_loaded:
            reason = self.plugin_error.strip().replace("\n", "; ") or "no error message"
            return (f"the installed MindSpore could not load its Ascend plugin ({reason}): install the CANN toolkit "
                    f"and driver and `source /usr/local/Ascend/ascend-toolkit/set_env.sh`")
        return "MindSpore's Ascend plugin loaded but reports 0 devices: check the NPU driver (npu-smi info) and " \
               f"{VISIBLE_ENV}"


@dataclass(frozen=True)
class Device:
    target: str                    # "cpu" | "ascend"
    device_id: int = 0             # the id MindSpore is given (logical under ASCEND_RT_VISIBLE_DEVICES)
    physical_id: int | None = None  # the card's id on the host (Ascend)
    sku: str = ""                  # e.g. "ascend-910b1" (Ascend only)

    @property
    def mindspore_target(self) -> str:
        return "Ascend" if self.target == "ascend" else "CPU"

    @property
    def soc_family(self) -> str:
        """'910b', '310p', ... ('' on CPU)."""
        return ascend_family(family_of(self.sku)[len("ascend-"):]) if self.target == "ascend" else ""

    @property
    def supports_bf16(self) -> bool:
        """bf16 graphs on this device (the CPU kernels widen what the CPU lacks)."""
        return self.soc_family not in NO_BF16_FAMILIES

    def describe(self) -> str:
        if self.target == "cpu":
            return "CPU"
        card = f", card {self.physical_id}" if self.physical_id != self.device_id else ""
        return f"Ascend device {self.device_id}{card} ({self.sku or 'SoC unknown'})"


CPU = Device("cpu")


def probe_npu() -> NpuProbe:
    """Asks the installed MindSpore (no device is initialised, nothing is logged)."""
    from mindspore._c_expression import MSContext  # noqa: PLC0415  (imports MindSpore: only when asked)

    context = MSContext.get_instance()
    if not context.is_pkg_support_device("Ascend"):
        return NpuProbe(False, context.load_plugin_error())
    try:
        from mindspore._c_expression import ascend_get_device_count  # noqa: PLC0415
        count = int(ascend_get_device_count())
    except Exception as error:  # noqa: BLE001  (a broken driver reads as no device, with its message)
        return NpuProbe(True, str(error), 0)
    return NpuProbe(True, "", count)


def visible_devices(env: dict[str, str]) -> list[int] | None:
    """ASCEND_RT_VISIBLE_DEVICES as card ids, None when unset."""
    text = env.get(VISIBLE_ENV, "").strip()
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{VISIBLE_ENV} must be comma-separated device ids, got {text!r}") from None


def local_device_ids(env: dict[str, str], device_count: int) -> tuple[int, int]:
    """(the id MindSpore is given, the physical card) of this process: its local rank (msrun's DEVICE_ID, 0 for a
    single process), checked against the devices it can see."""
    text = env.get(DEVICE_ID_ENV, "0").strip() or "0"
    if not text.isdigit():
        raise ValueError(f"{DEVICE_ID_ENV} (msrun's local rank) must be a non-negative int, got {text!r}")
    local = int(text)
    visible = visible_devices(env)
    seen = len(visible) if visible is not None else device_count
    if local >= seen:
        where = f"{VISIBLE_ENV}={env.get(VISIBLE_ENV)}" if visible is not None else f"{device_count} device(s)"
        raise DeviceUnavailableError(f"local rank {local} has no device: this process sees {where}")
    return local, visible[local] if visible is not None else local


def resolve_device(name: str, probe: NpuProbe, env: dict[str, str], sku: str) -> Device:
    """The device `name` means on a host that `probe` describes (pure: the tests pass a faked host)."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cpu" or (name == "auto" and not probe.available):
        return CPU
    if not probe.available:
        raise DeviceUnavailableError(f"device='ascend' needs an Ascend NPU, and none is usable here: "
                                     f"{probe.missing()}")
    logical, physical = local_device_ids(env, probe.device_count)
    return Device("ascend", logical, physical, sku if sku.startswith("ascend-") else "")


@functools.lru_cache(maxsize=None)
def select_device(name: str = "auto") -> Device:
    """The device of this process for `name` ('auto', 'cpu', 'ascend'); says once which it chose."""
    probe = NpuProbe(False, "not probed: device='cpu'") if name == "cpu" else probe_npu()
    device = resolve_device(name, probe, dict(os.environ), detect_sku_info().sku_id)
    _visible_by_default()
    logger.info("cogvlm2: device=%r runs on %s%s", name, device.describe(),
                " (MindSpore reports no Ascend NPU)" if name == "auto" and device.target == "cpu" else "")
    return device


def _visible_by_default() -> None:
    """The choice is shown on stderr when the application configured no logging (else its handlers decide)."""
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def device_from_env() -> str:
    """The device name a worker was launched for (COGVLM2_DEVICE); 'cpu' when unset: the programs that configure
    MindSpore without naming a device (the kernel tools, the simple one-request loop, benchmarks) are CPU programs,
    and the engine always names its device."""
    return os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"


def launch_env(device: str, size: int, env: dict[str, str]) -> dict[str, str]:
    """What a tensor-parallel launch of `size` workers adds to the environment `env` for `device`: the device name
    (each worker selects its own card from its local rank), and on Ascend HCCL's settings and the cards used."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    added = {DEVICE_ENV: device}
    if device != "ascend":
        return added
    visible = visible_devices(env)
    if visible is not None and len(visible) < size:
        raise ValueError(f"tensor_parallel_size {size} needs {size} devices, {VISIBLE_ENV}={env[VISIBLE_ENV]} "
                         f"lists {len(visible)}")
    for key, value in HCCL_DEFAULTS.items():
        exported = env.get(key)
        added[key] = value if exported in (None, MINDSPORE_IMPORT_DEFAULTS.get(key)) else exported
    if visible is None:
        added[VISIBLE_ENV] = ",".join(str(i) for i in range(size))
    return added
