"""The decode kernels compile for an H100/H200 (sm_90) with no register spills, checked without
a GPU: Triton's interpreter (which the other kernel tests use on the CPU) runs the kernels as
Python and so never sees a compile error, a spill or a K/V loop the pipeliner leaves alone.

Compiles in a subprocess without TRITON_INTERPRET, with the 16-divisibility the JIT gives
pointers and strides at Llama-3.1-8B shapes (bf16, GQA 32/8, head_dim 128, block 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = r"""
import json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from apex_grpc.attention import triton_paged as tp

TYPES = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
         "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "partial_out_ptr": "*fp32",
         "partial_lse_ptr": "*fp32", "qk_scale": "fp32"}

def compile_for_hopper(fn, consts):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = TYPES.get(name, "i32")
        if sig[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": 3})

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")
report = {}
for name, fn, consts in [
    ("decode_split", tp._paged_decode_kernel, dict(
        GROUP=4, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, BLOCK_N=64,
        WRITE_PARTIAL=True, FP32_DOT=False)),
    ("merge", tp._merge_splits_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, SPLITS_PAD=32)),
]:
    kernel = compile_for_hopper(fn, consts)
    path = f"{sys.argv[1]}/{name}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True,
                           check=True).stdout
    report[name] = {"usage": usage, "cp_async": kernel.asm["ptx"].count("cp.async")}
print(json.dumps(report))
"""


def test_decode_kernels_compile_for_hopper_without_spills(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, entry in report.items():
        usage = entry["usage"]
        assert "REG:" in usage, (name, usage)
        assert "LOCAL:0 " in usage, f"{name} spills to local memory: {usage}"
    # With num_stages=3 the split kernel's K/V tile loads are software-pipelined (cp.async).
    assert report["decode_split"]["cp_async"] > 0
