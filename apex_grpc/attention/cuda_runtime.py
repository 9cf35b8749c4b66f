"""The CUDA runtime entry points the native hybrid hand-off calls (kernels/cpu_attention/
handoff.cpp): found in the libcudart that torch already loaded, so the extension itself needs
no CUDA to build and the copies and waits it enqueues share torch's streams and context."""

from __future__ import annotations

import ctypes

# The order LayerHandoff expects.
ENTRY_POINTS = ("cudaMemcpyAsync", "cudaMemcpy2DAsync", "cudaEventCreateWithFlags",
                "cudaEventDestroy", "cudaEventRecord", "cudaStreamWaitEvent",
                "cudaLaunchHostFunc")


def cuda_runtime_addresses() -> list[int]:
    """Addresses of ENTRY_POINTS in this process's libcudart (call after CUDA is initialised)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        paths = sorted({line.rsplit(None, 1)[-1] for line in maps if "libcudart.so" in line})
    if not paths:
        raise RuntimeError("no libcudart is loaded in this process: the hybrid runtime needs "
                           "the CUDA runtime torch uses")
    library = ctypes.CDLL(paths[0])
    return [ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in ENTRY_POINTS]
