#!/usr/bin/env bash
# One call on the GPU machine: build the native kernel, run the CUDA tests, then the
# benchmarks: the decode step against its floor (graphed vs eager vs the linear work alone as a
# graph, and the graphed hybrid step), the decode attention kernels against dense SDPA inside
# CUDA graphs, the native CPU attention kernel per ISA and host KV dtype on the host's cores,
# the policy grid (profile, then serve gpu-only/neo/apex at four GPU KV budgets beside the
# simulator's prediction) and the hybrid runtime benchmark. Every step has its own timeout (a
# blocked CUDA wait must not burn the lease), cut to what is left of the script's
# GPU_CHECK_LIMIT_S (default 540 s: the device tool stops a command at 600 s); later steps are
# skipped once it is spent. Logs and the JSON lines (gpu_check.log, figures.jsonl) go to $OUT
# (or /tmp/apex-gpu); the grid's own logs and results stay on the machine under
# /tmp/apex-policy-grid (the tool brings back few files).
# GPU_CHECK_WAITS=1 adds the hybrid benchmark once per CPU -> GPU wait (issue 9's comparison,
# about 1.5 minutes more). GPU_CHECK_STEPS="..." runs only the named steps: issue 15's figures
# are "build gpu-tests decode-step gpu-attention policy-grid", issue 16's "build cpu-attention".
#
# The GPU image lacks gguf (the model loader imports it) and the gRPC health and reflection
# packages (the server's, for the policy grid), and its grpcio/protobuf may be older than the
# committed stubs need; carry them as wheels (about 8 MB; see the device tool's README):
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl gguf==0.19.0 \
#     grpcio==1.85.4 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
# and run:  bash scripts/gpu_check.sh        (with .whl carried)
# The embedded model's wheel (89 MB) is over the tool's 64 MiB limit: its tests skip there.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/apex-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

TOTAL_LIMIT=${GPU_CHECK_LIMIT_S:-540}
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  case " ${GPU_CHECK_STEPS:-$name} " in *" $name "*) ;; *) return ;; esac
  local left=$((TOTAL_LIMIT - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name skipped: the script's ${TOTAL_LIMIT}s are spent" | tee -a "$OUT/gpu_check.log"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$OUT/step.log" 2>&1
  local status=$?
  tail -n 15 "$OUT/step.log"
  echo "== $name exit $status after $((SECONDS - start))s"
  # One log for all steps: the tool brings back at most 8 files.
  { echo "== $name exit $status"; cat "$OUT/step.log"; } >> "$OUT/gpu_check.log"
  grep -h '^{' "$OUT/step.log" >> "$OUT/figures.jsonl"
  rm -f "$OUT/step.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
grep -m1 "model name" /proc/cpuinfo; nproc
lscpu | grep -iE "^(thread|core|socket|numa node\(s\))"
echo "cpu0 siblings: $(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list)"
step build 90 python3 setup.py -q build_ext --inplace --parallel 16
python3 -c "import torch
from apex_grpc.attention.cuda_runtime import stream_memory_ops_supported as s
torch.zeros(1, device='cuda')
print('64-bit stream memory ops:', s(0))"
# The CUDA tests first: the hybrid runtime's native CUDA hand-off must be right before it is
# timed.
step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_layer_handoff.py tests/kernels/test_triton_attention.py \
  tests/e2e/test_decode_graphs.py tests/e2e/test_hybrid_equivalence.py \
  tests/model/test_torch_ref.py \
  tests/kernels/test_cpu_attention_validation.py tests/kernels/test_decode_layers.py \
  tests/kernels/test_gpu_attention_bench.py tests/e2e/test_host_kv_int8.py
# The decode step at B = 1, 8, 32, 64: graphed, eager, and the linear floor; graphed G=2 + C=6
# against graphed G=2.
step decode-step 120 python3 -m apex_grpc.bench.decode_step --steps 10
# Paged decode (single-pass, split-KV, a split sweep) against dense SDPA, batch 1/4/16 x
# context 512/2048/8192, inside CUDA graphs: one JSON line per case.
step gpu-attention 120 python3 -m apex_grpc.bench.gpu_attention
# The native CPU attention kernel on the 16-core host, per ISA path and host KV dtype.
step cpu-attention 60 python3 -m apex_grpc.bench.cpu_attention --quick --isa all \
  --kv-dtype bf16,int8
# The policy grid starts no serving run after 235 s and kills a stuck one after 45 s; on this
# step's timeout it prints what it measured (SIGTERM).
step policy-grid 270 python3 -m apex_grpc.bench.policy_grid --out /tmp/apex-policy-grid
sed -n '/^== policy-grid exit/,$p' "$OUT/gpu_check.log" | grep -E '^(\||PASS|MISS|TPOT|error)'
# The default wait with the workload; with GPU_CHECK_WAITS=1 each wait on its own too
# (absolute step times drift from one process to the next, so the default is measured twice
# more).
step hybrid-bench 100 python3 -m apex_grpc.bench.hybrid
if [ "${GPU_CHECK_WAITS:-0}" = 1 ]; then
  for wait in stream-wait host-func engine-thread stream-wait; do
    step "hybrid-bench-$wait" 60 python3 -m apex_grpc.bench.hybrid --skip-workload --steps 40 \
      --cuda-layer-wait $wait
  done
fi
