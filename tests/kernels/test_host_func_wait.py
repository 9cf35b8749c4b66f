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
    record = torch.tensor([flag.data_ptr(), 3, 0], dtype=torch.int64)  # no reset
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
    assert flag.item() == 3  # left as raised: eager steps wait for their own sequence number


def test_captured_wait_returns_on_any_raise_and_rearms_the_flag():
    """A captured graph's record ({flag, 1, reset}) waits for any step's raise and resets the
    flag, so the next replay waits again."""
    flag = torch.zeros(1, dtype=torch.int64)
    record = torch.tensor([flag.data_ptr(), 1, 1], dtype=torch.int64)
    wait = HOST_FN(_cpu_attention.host_func_wait_address())
    for step in (7, 8):
        threading.Timer(0.05, set_flag, (flag, step)).start()
        wait(record.data_ptr())
        assert flag.item() == 0
