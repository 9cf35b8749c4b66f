"""The native per-layer hand-off of the hybrid runtime (kernels/cpu_attention/handoff.cpp):
staging copies row-strided q/k/v and raises the ready flag behind them; fetch waits for the
done flag and copies the output rows out. On a CPU the copies are memcpy; on CUDA they go
through the CUDA runtime torch loaded, and the host-function and stream waits hold the
compute stream."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from apex_grpc import _cpu_attention
from apex_grpc.attention.cpu_kernel import set_flag
from apex_grpc.platform import pinned_empty

HEADS, KV_HEADS, HEAD_DIM = 2, 1, 8


QKV_HEADS = HEADS + 2 * KV_HEADS


@dataclass
class Buffers:
    qkv: torch.Tensor  # [parity, rows, q|k|v heads, head_dim], like HostAttention's staging
    out: torch.Tensor  # [parity, rows, heads, head_dim]
    flags: torch.Tensor  # [ready | done, layers, 1]
    seq_device: torch.Tensor | None  # the step's sequence number, on CUDA


# The native LayerWait codes.
ENGINE_THREAD, HOST_FUNC, STREAM_WAIT = 0, 1, 2


def make_handoff(num_layers: int, rows: int, device: torch.device = torch.device("cpu"),
                 wait: int = ENGINE_THREAD, timeout_s: float = 5.0, use_memory_ops: bool = True):
    """use_memory_ops=False: on CUDA, the ready flag as a copy even where the device has stream
    memory operations (the path of devices without them)."""
    def staging(heads: int) -> torch.Tensor:
        return pinned_empty((2, rows, heads, HEAD_DIM), torch.float32, device).zero_()

    on_cuda = device.type == "cuda"
    buffers = Buffers(staging(QKV_HEADS), staging(HEADS),
                      pinned_empty((2, num_layers, 1), torch.int64, device).zero_(),
                      torch.zeros(1, dtype=torch.int64, device=device) if on_cuda else None)
    memory_ops = False
    if on_cuda:
        from apex_grpc.attention.cuda_runtime import (cuda_runtime_addresses,
                                                      device_address_of_host,
                                                      stream_memory_ops_supported)
        memory_ops = stream_memory_ops_supported(torch.cuda.current_device()) and use_memory_ops
        if wait == STREAM_WAIT and not memory_ops:
            pytest.skip("this GPU lacks 64-bit stream memory operations")
    handoff = _cpu_attention.LayerHandoff(
        num_layers=num_layers, max_rows=rows, qkv_row_bytes=QKV_HEADS * HEAD_DIM * 4,
        out_row_bytes=HEADS * HEAD_DIM * 4,
        staging=[b[p].data_ptr() for p in range(2) for b in (buffers.qkv, buffers.out)],
        flags=buffers.flags.data_ptr(),
        # Always on CUDA: captured hand-offs copy their ready flags from it.
        seq_on_device=buffers.seq_device.data_ptr() if on_cuda else 0,
        flags_on_device=device_address_of_host(buffers.flags.data_ptr()) if memory_ops else 0,
        cuda=cuda_runtime_addresses(memory_ops) if on_cuda else [], wait=wait,
        timeout_s=timeout_s)
    return handoff, buffers


def strided_rows(num_rows: int, heads: int, device: torch.device) -> torch.Tensor:
    """[num_rows, heads, HEAD_DIM] whose rows are HEAD_DIM elements apart beyond their heads
    (a view into a wider tensor, like q/k/v split from one projection)."""
    wide = torch.randn(num_rows, heads * HEAD_DIM + HEAD_DIM, device=device)
    return wide[:, :heads * HEAD_DIM].view(num_rows, heads, HEAD_DIM)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


STAGE_CASES = [("cpu", True)] + ([("cuda", True), ("cuda", False)]
                                 if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device, use_memory_ops", STAGE_CASES)
def test_stage_copies_the_host_rows_then_raises_the_ready_flag(device, use_memory_ops):
    device = torch.device(device)
    handoff, buffers = make_handoff(num_layers=3, rows=2, device=device,
                                    use_memory_ops=use_memory_ops)
    qkv = strided_rows(5, QKV_HEADS, device)
    if buffers.seq_device is not None:
        buffers.seq_device.fill_(7)
    stream = torch.cuda.current_stream().cuda_stream if device.type == "cuda" else 0
    handoff.begin_step(7, 2, stream)
    handoff.stage(1, qkv.data_ptr(), qkv.stride(0) * 4, 3)  # rows 3 and 4
    assert _cpu_attention.wait_flag(buffers.flags[0, 1].data_ptr(), 7, 5.0)
    assert int(buffers.flags[0, 0]) == 0 and int(buffers.flags[0, 2]) == 0
    torch.testing.assert_close(buffers.qkv[1], qkv[3:5].cpu(), rtol=0, atol=0)  # layer 1: odd
    assert not bool(buffers.qkv[0].any()), "the even parity's staging was written"


@pytest.mark.parametrize("device", DEVICES)
def test_fetch_waits_for_the_done_flag_then_copies_the_output_rows(device):
    device = torch.device(device)
    handoff, buffers = make_handoff(num_layers=2, rows=2, device=device)
    stream = torch.cuda.current_stream().cuda_stream if device.type == "cuda" else 0
    handoff.begin_step(4, 2, stream)
    buffers.out[0].copy_(torch.arange(2 * HEADS * HEAD_DIM, dtype=torch.float32)
                         .view(2, HEADS, HEAD_DIM))
    dst = strided_rows(6, HEADS, device).zero_()
    set_flag(buffers.flags[1, 0], 3)  # an older step's completion must not release the wait
    raised_at = []

    def raise_later() -> None:
        time.sleep(0.2)
        raised_at.append(time.monotonic())
        set_flag(buffers.flags[1, 0], 4)

    threading.Thread(target=raise_later).start()
    handoff.fetch(0, dst.data_ptr() + 2 * dst.stride(0) * 4, dst.stride(0) * 4)  # rows 2, 3
    assert raised_at and time.monotonic() >= raised_at[0]
    got = dst.cpu()
    torch.testing.assert_close(got[2:4], buffers.out[0], rtol=0, atol=0)
    assert not bool(got[:2].any()) and not bool(got[4:].any())


def test_a_job_that_never_finishes_fails_the_fetch_naming_the_layer():
    handoff, _ = make_handoff(num_layers=2, rows=1, timeout_s=0.1)
    handoff.begin_step(1, 1, 0)
    dst = torch.zeros(1, HEADS, HEAD_DIM)
    with pytest.raises(RuntimeError, match="layer 1 did not finish"):
        handoff.fetch(1, dst.data_ptr(), dst.stride(0) * 4)


def test_bad_arguments_are_refused():
    handoff, _ = make_handoff(num_layers=2, rows=2)
    with pytest.raises(ValueError, match="exceed the staging capacity"):
        handoff.begin_step(1, 3, 0)
    handoff.begin_step(1, 2, 0)
    with pytest.raises(IndexError):
        handoff.fetch(2, 0, 0)
    for wait in (HOST_FUNC, STREAM_WAIT):
        with pytest.raises(ValueError, match="need CUDA"):
            make_handoff(num_layers=1, rows=1, wait=wait)
    with pytest.raises(ValueError, match="unknown layer wait"):
        make_handoff(num_layers=1, rows=1, wait=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("wait", [HOST_FUNC, STREAM_WAIT], ids=["host-func", "stream-wait"])
def test_a_device_side_wait_holds_later_cuda_work_until_the_flag_is_raised(wait):
    handoff, buffers = make_handoff(num_layers=1, rows=1, device=torch.device("cuda"),
                                    wait=wait)
    stream = torch.cuda.current_stream()
    handoff.begin_step(2, 1, stream.cuda_stream)
    set_flag(buffers.flags[1, 0], 1)  # an older step's completion must not release the wait
    buffers.out[0].fill_(3.0)  # what the CPU job would have written
    dst = torch.zeros((1, HEADS, HEAD_DIM), device="cuda")
    handoff.fetch(0, dst.data_ptr(), dst.stride(0) * 4)
    marker = torch.zeros(1, device="cuda")
    marker.fill_(1.0)  # queued behind the wait and the upload
    done = torch.cuda.Event()
    done.record(stream)
    time.sleep(0.2)
    try:
        assert not done.query(), "the stream ran past the wait before the flag was set"
        set_flag(buffers.flags[1, 0], 2)
        deadline = time.monotonic() + 10.0
        while not done.query():  # polled: a broken wait fails the test instead of hanging it
            assert time.monotonic() < deadline, "the flag was raised but the stream still waits"
            time.sleep(0.001)
    finally:
        set_flag(buffers.flags[1, 0], 1 << 40)  # never leave a stream waiting behind
        torch.cuda.synchronize()
    assert marker.item() == 1.0
    assert bool((dst == 3.0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("wait", [HOST_FUNC, STREAM_WAIT], ids=["host-func", "stream-wait"])
def test_a_captured_handoff_serves_every_replay(wait):
    """Captured once, replayed per step: the ready flags carry each replay's sequence number
    (from device memory), the waits pass only on that step's done flags (zeroed before it)."""
    num_layers, rows = 2, 3
    handoff, buffers = make_handoff(num_layers=num_layers, rows=rows, device=torch.device("cuda"),
                                    wait=wait)
    src = torch.zeros((rows + 1, QKV_HEADS, HEAD_DIM), device="cuda")  # one row before the host rows
    dst = torch.zeros((rows + 1, HEADS, HEAD_DIM), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        handoff.begin_capture(rows, torch.cuda.current_stream().cuda_stream)
        for layer in range(num_layers):
            handoff.stage(layer, src.data_ptr(), src.stride(0) * 4, 1)
            handoff.fetch(layer, dst[1:].data_ptr(), dst.stride(0) * 4)
        handoff.end_capture()
    staged = []

    def cpu_jobs(seq: int) -> None:  # what the pool's jobs do, per layer in order
        for layer in range(num_layers):
            assert _cpu_attention.wait_flag(buffers.flags[0, layer].data_ptr(), seq, 10.0)
            staged.append(buffers.qkv[layer % 2, :rows].clone())
            buffers.out[layer % 2, :rows].fill_(10.0 * seq + layer)
            set_flag(buffers.flags[1, layer], seq)

    for seq in (1, 2, 3):
        src.fill_(float(seq))
        buffers.flags[1].zero_()
        buffers.seq_device.fill_(seq)
        jobs = threading.Thread(target=cpu_jobs, args=(seq,))
        jobs.start()
        graph.replay()
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + 10.0
        try:
            while not done.query():  # polled: a broken wait fails the test instead of hanging it
                assert time.monotonic() < deadline, f"replay {seq} still waits"
                time.sleep(0.001)
        finally:
            buffers.flags[1].fill_(1 << 40)  # never leave a stream waiting behind
            torch.cuda.synchronize()
            jobs.join(10.0)
        assert bool((dst[1:] == 10.0 * seq + num_layers - 1).all()) and bool((dst[0] == 0).all())
        assert all(bool((rows_seen == seq).all()) for rows_seen in staged[-num_layers:])
