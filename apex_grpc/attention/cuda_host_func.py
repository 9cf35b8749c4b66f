"""The device-side CPU -> GPU wait of the hybrid runtime (opt-in: --cuda-layer-wait host-func).

Instead of the engine thread waiting for each layer's CPU attention before it launches the O
projection, a CUDA host function is enqueued on the compute stream (cudaLaunchHostFunc): the
stream itself holds at that point until the layer's done flag is raised, so the engine thread
enqueues a whole step without waiting. The host function is native code in the CPU-attention
extension (no Python, bounded by a timeout); this module only finds cudaLaunchHostFunc in the
CUDA runtime torch already loaded and keeps the per-(step parity, layer) records it reads.
"""

from __future__ import annotations

import ctypes

import torch

from apex_grpc import _cpu_attention


def _launch_host_func() -> ctypes._CFuncPtr:
    """cudaLaunchHostFunc from the libcudart mapped into this process (the one torch uses)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        paths = {line.rsplit(None, 1)[-1] for line in maps if "libcudart.so" in line}
    for path in sorted(paths):
        launch = ctypes.CDLL(path).cudaLaunchHostFunc
        launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        launch.restype = ctypes.c_int
        return launch
    raise RuntimeError("no libcudart is loaded in this process: use --cuda-layer-wait "
                       "engine-thread")


class HostFuncWaiter:
    """Enqueues 'wait until done_flags[layer] >= step' on a CUDA stream."""

    def __init__(self, done_flags: torch.Tensor) -> None:  # [num_layers, 1] int64, pinned
        self._launch = _launch_host_func()
        self._fn = _cpu_attention.host_func_wait_address()
        num_layers = done_flags.shape[0]
        # [step parity, layer, (flag address, value)]: a record is read when the stream gets
        # there, so the next step writes the other parity; two steps later it has been read.
        self.records = torch.zeros((2, num_layers, 2), dtype=torch.int64)
        addresses = torch.tensor([done_flags[layer].data_ptr() for layer in range(num_layers)])
        self.records[:, :, 0] = addresses

    def begin_step(self, step: int) -> None:
        self.records[step % 2, :, 1] = step

    def enqueue(self, layer: int, step: int, stream: torch.cuda.Stream) -> None:
        record = self.records[step % 2, layer]
        status = self._launch(ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(self._fn),
                              ctypes.c_void_p(record.data_ptr()))
        if status != 0:
            raise RuntimeError(f"cudaLaunchHostFunc failed with CUDA error {status}")
