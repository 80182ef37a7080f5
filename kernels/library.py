"""The CPU kernel library (kernels/cpu/*.cc, built by setup.py) and the GEMM libraries it is handed: where they
are and loading them once. kernels.ops wraps its entry points as MindSpore ops; kernels.pyboost builds the eager
twin against it."""
from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np

LIBRARY_GLOB = str(Path(__file__).parent / "cpu" / "_cogvlm2_kernels*.so")


class KernelLibraryError(RuntimeError):
    pass


def find_library() -> str:
    """COGVLM2_KERNEL_LIBRARY, else the library built next to this file."""
    if os.environ.get("COGVLM2_KERNEL_LIBRARY"):
        return os.environ["COGVLM2_KERNEL_LIBRARY"]
    paths = sorted(glob.glob(LIBRARY_GLOB))
    if not paths:
        raise KernelLibraryError(f"no kernel library matches {LIBRARY_GLOB}: build it with `pip install -e .` "
                                 "(needs a C++17 compiler)")
    return paths[-1]


def find_blas() -> str | None:
    """An OpenBLAS with an SGEMM: COGVLM2_BLAS, else the one inside the numpy (or scipy) wheel, else the system's.
    numpy is imported first, so the wheel's libgfortran it depends on is already loaded."""
    if os.environ.get("COGVLM2_BLAS"):
        return os.environ["COGVLM2_BLAS"]
    site = Path(np.__file__).parent.parent
    for pattern in ("numpy.libs/libopenblas*.so*", "scipy.libs/libscipy_openblas*.so*"):
        found = sorted(glob.glob(str(site / pattern)))
        if found:
            return found[0]
    for name in ("libopenblas.so.0", "libopenblas.so", "libcblas.so.3", "libblas.so.3"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def find_onednn() -> str | None:
    """The oneDNN that ships inside the MindSpore wheel (mindspore/lib/libdnnl.so.3): dnnl_sgemm, single-threaded."""
    found = sorted(glob.glob(str(Path(ms.__file__).parent / "lib" / "libdnnl.so*")))
    return found[0] if found else None


@dataclass(frozen=True)
class Library:
    path: str
    blas: str | None    # an OpenBLAS with an SGEMM, or None
    onednn: str | None  # oneDNN's dnnl_sgemm, or None; expert_linear falls back to the built-in GEMM


_library: Library | None = None


def load_library() -> Library:
    """Opens the kernel library once and hands it the GEMM libraries. MindSpore dlopens the same file later, which
    returns the same handle, so the GEMMs given here are the ones its kernels call."""
    global _library
    if _library is None:
        path = find_library()
        handle = ctypes.CDLL(path)
        blas, onednn = find_blas(), find_onednn()
        if blas is not None and handle.cogvlm2_load_blas(blas.encode()) != 0:
            blas = None
        if onednn is not None and handle.cogvlm2_load_onednn(onednn.encode()) != 0:
            onednn = None
        _library = Library(path, blas, onednn)
    return _library
