"""Eager (PyNative) dispatch of the in-place CPU kernels through MindSpore's pyboost runner (ops.CustomOpBuilder).

An `ops.Custom(func_type="aot")` call costs ~90-100 us of MindSpore dispatch here, which is nearly all of a
decode-sized rotary; the pyboost path costs ~3 us. kernels/cpu/pyboost_ops.cpp calls the AOT library's own entry
points, so both paths run the same kernel. It is compiled against MindSpore's headers by `scripts/setup.sh`
(`python -m kernels.pyboost`, ~30 s once) into kernels/cpu/pyboost_build/; where that build is missing or fails,
`load()` returns None and the registry keeps the AOT ops. Inside mindspore.jit the AOT ops are always used.

    python -m kernels.pyboost      # build (or check) the extension
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "cpu" / "pyboost_ops.cpp"
BUILD_DIR = Path(__file__).resolve().parent / "cpu" / "pyboost_build"
NAME = "cogvlm2_pyboost_ops"


def is_built() -> bool:
    return any(BUILD_DIR.glob(f"{NAME}*.so"))


def load(library_path: str, build: bool = False):
    """The extension module with its kernel library set, or None when it is not built (and build is False) or
    does not load. Without `build` the built module is imported directly: MindSpore's builder takes a file lock
    even when nothing is to be built, and a process killed while holding it (a tensor-parallel worker, say) would
    leave every later start-up waiting on it."""
    if not build and not is_built():
        return None
    try:
        module = _build() if build else _import_built()
        module.set_library(library_path)
        return module
    except Exception as error:  # noqa: BLE001  (no compiler, no headers: the AOT ops still work)
        warnings.warn(f"cogvlm2 kernels: the pyboost extension is unavailable ({error}); eager calls use the AOT ops",
                      RuntimeWarning, stacklevel=2)
        return None


def _build():
    from mindspore import ops
    return ops.CustomOpBuilder(NAME, [str(SOURCE)], backend="CPU", build_dir=str(BUILD_DIR), cflags="-O2").load()


def _import_built():
    import mindspore  # noqa: F401  (the extension links against MindSpore's libraries, loaded by this import)
    path = next(BUILD_DIR.glob(f"{NAME}*.so"))
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from kernels.library import load_library
    from kernels.runtime import configure_mindspore
    configure_mindspore()
    print(f"building the eager-dispatch extension into {BUILD_DIR} (about 30 s the first time)", flush=True)
    module = load(load_library().path, build=True)
    print("ok" if module is not None else "failed: the engine will use the AOT ops for eager calls")
    return 0 if module is not None else 1


if __name__ == "__main__":
    sys.exit(main())
