"""The host KV tier's memory (platform.host_kv_zeros): zeroed, writable, owned by its tensor,
and on Linux a mapping that transparent huge pages may back."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch

from apex_grpc.platform import host_kv_zeros

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapping_of(address: int) -> str:
    """The /proc/self/smaps entry of the mapping that holds address."""
    entries = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text())
    for entry in entries:
        start, end = (int(bound, 16) for bound in entry.split()[0].split("-"))
        if start <= address < end:
            return entry
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float32])
def test_zeroed_writable_and_shaped(dtype):
    shape = (2, 2, 5, 3, 16, 64)
    tier = host_kv_zeros(shape, dtype, torch.device("cpu"))
    assert tier.shape == shape and tier.dtype == dtype and tier.is_contiguous()
    assert not tier.any()
    tier[1, 0, 4] = 3
    assert int(tier.to(torch.int64).sum()) == 3 * 3 * 16 * 64


def test_empty_tier():
    assert host_kv_zeros((2, 2, 0, 3, 16, 64), torch.bfloat16, torch.device("cpu")).numel() == 0


def test_the_tensor_keeps_its_memory():
    tier = host_kv_zeros((4, 1024), torch.float32, torch.device("cpu"))
    view = tier[2]
    del tier
    gc.collect()
    view.fill_(1.5)  # the mapping is still there: no crash, values stick
    assert float(view.sum()) == 1.5 * 1024


def test_huge_pages_requested():
    if not THP_MODE.exists() or "[never]" in THP_MODE.read_text():
        pytest.skip("this kernel has transparent huge pages off")
    tier = host_kv_zeros((8, 2, 1024, 1024), torch.int8, torch.device("cpu"))  # 16 MiB
    tier.fill_(1)
    assert re.search(r"^THPeligible:\s+1$", _mapping_of(tier.data_ptr()), re.MULTILINE)
