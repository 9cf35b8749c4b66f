"""The native CUDA host function of the hybrid runtime's device-side wait.

Its waiting logic runs here by calling it like the CUDA driver would (a plain C call with the
record pointer); on a CUDA machine the stream itself is held by it.
"""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_function_holds_the_cuda_stream_until_the_flag_is_raised():
    from apex_grpc.attention.cuda_host_func import HostFuncWaiter

    flags = torch.zeros((1, 1), dtype=torch.int64).pin_memory()
    waiter = HostFuncWaiter(flags)
    waiter.begin_step(1)
    stream = torch.cuda.current_stream()
    marker = torch.zeros(1, device="cuda")
    waiter.enqueue(0, 1, stream)
    marker.fill_(1.0)  # queued behind the host function
    done = torch.cuda.Event()
    done.record(stream)
    time.sleep(0.2)
    assert not done.query(), "the stream ran past the host function before the flag was set"
    set_flag(flags[0], 1)
    done.synchronize()
    assert marker.item() == 1.0
