"""The native CUDA host function of the hybrid runtime's device-side wait.

Its waiting logic runs here by calling it like the CUDA driver would (a plain C call with the
record pointer); test_layer_handoff.py checks on a CUDA machine that it holds the stream.
"""

from __future__ import annotations

import ctypes
import threading
import time

import torch

from apex_grpc import _cpu_attention
from apex_grpc.attention.cpu_kernel import set_flag

HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def test_host_function_returns_only_once_the_flag_reaches_the_value():
    flag = torch.zeros(1, dtype=torch.int64)
    record = torch.tensor([flag.data_ptr(), 3], dtype=torch.int64)
    wait = HOST_FN(_cpu_attention.host_func_wait_address())
    set_flag(flag, 2)  # an older step's value must not release the wait
    raised_at = []

    def raise_later() -> None:
        time.sleep(0.2)
        raised_at.append(time.monotonic())
        set_flag(flag, 3)

    threading.Thread(target=raise_later).start()
    wait(record.data_ptr())
    returned_at = time.monotonic()
    assert raised_at and returned_at >= raised_at[0]
