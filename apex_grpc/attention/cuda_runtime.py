"""The CUDA entry points the native hybrid hand-off calls (kernels/cpu_attention/handoff.cpp):
found in the libcudart and libcuda that torch already loaded, so the extension itself needs no
CUDA to build and the copies and waits it enqueues share torch's streams and context."""

from __future__ import annotations

import ctypes
import functools

# The order LayerHandoff expects: (library, symbol). The stream memory operations are the
# driver API's v2 entry points, resolved only where the device supports them.
ENTRY_POINTS = (("cudart", "cudaMemcpyAsync"), ("cudart", "cudaMemcpy2DAsync"),
                ("cudart", "cudaLaunchHostFunc"), ("cuda", "cuStreamWaitValue64_v2"),
                ("cuda", "cuStreamWriteValue64_v2"))

# CUdevice_attribute: 64-bit values in cuStreamWriteValue64/cuStreamWaitValue64.
_CAN_USE_64_BIT_STREAM_MEM_OPS = 122


@functools.cache
def _library(name: str) -> ctypes.CDLL:
    """This process's copy of libcudart (torch's) or libcuda (call after CUDA is initialised)."""
    marker = {"cudart": "libcudart.so", "cuda": "libcuda.so"}[name]
    with open("/proc/self/maps", encoding="utf-8") as maps:
        paths = sorted({line.rsplit(None, 1)[-1] for line in maps if marker in line})
    if not paths:
        raise RuntimeError(f"no {marker} is loaded in this process: the hybrid runtime needs "
                           "the CUDA libraries torch uses")
    return ctypes.CDLL(paths[0])


def cuda_runtime_addresses(memory_ops: bool) -> list[int]:
    """Addresses of ENTRY_POINTS, in order; the driver's stream memory operations are 0
    unless memory_ops."""
    return [ctypes.cast(getattr(_library(library), symbol), ctypes.c_void_p).value
            if library == "cudart" or memory_ops else 0
            for library, symbol in ENTRY_POINTS]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUDA error {status}")


def device_address_of_host(pointer: int) -> int:
    """The device address of pinned host memory (the same value under unified addressing),
    for stream memory operations on it."""
    address = ctypes.c_void_p()
    _check(_library("cudart").cudaHostGetDevicePointer(ctypes.byref(address),
                                                       ctypes.c_void_p(pointer), 0),
           "cudaHostGetDevicePointer")
    return address.value


def stream_memory_ops_supported(device_index: int) -> bool:
    """Whether the device takes 64-bit stream memory writes and waits."""
    driver = _library("cuda")
    device = ctypes.c_int()
    _check(driver.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
    supported = ctypes.c_int()
    _check(driver.cuDeviceGetAttribute(ctypes.byref(supported), _CAN_USE_64_BIT_STREAM_MEM_OPS,
                                       device), "cuDeviceGetAttribute")
    return bool(supported.value)

