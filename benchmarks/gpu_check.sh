#!/usr/bin/env bash
# The GPU device check (issue #16), one call of at most 8 minutes on a lent GPU machine: the
# CUDA-marked tests, benchmarks/kernels_gpu.py and benchmarks/hybrid.py (Llama-2-7B-shaped, then
# 13B-shaped if time is left: random-weight models generated there), each one's output written to
# $OUT (default out/gpu_check): summary.txt (machine, each step's exit status and time), NAME.txt
# per step, hybrid*.json (the benchmark's records).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, once: PuLP, gguf and threadpoolctl wheels into .whl/
#   bash benchmarks/gpu_check.sh                  # there (device tool: carry [".whl"]), or anywhere
#   bash benchmarks/gpu_check.sh --device cpu     # the same steps on the CPU stand-in, tiny shapes
#
# The GPU machine has torch, numba and psutil but no PyPI; wheels found in .whl/ are installed to
# /tmp/site first. Each step has its own time limit inside the 8 minutes; a step that fails or runs
# out of time is recorded in summary.txt and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
case "${1:-}" in
  --fetch-wheels)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "pulp>=2.8,<4" "gguf>=0.10" "threadpoolctl>=3.1"
    exit ;;
  --device) DEVICE=${2:?--device needs cuda or cpu} ;;
  "") ;;
  *) echo "usage: $0 [--fetch-wheels | --device cuda|cpu]" >&2; exit 2 ;;
esac
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + 470))

step() {  # step NAME SECONDS COMMAND...: run with a limit (never past the deadline), output to $OUT/NAME.txt
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 10)); then echo "$name: skipped, out of time" | tee -a "$OUT/summary.txt"; return; fi
  echo "== $name (limit ${limit} s): $*" >&2
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

{
  date -u
  python3 -c "import torch, numba; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'numba', numba.__version__);
print('devices:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  nproc
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
} >"$OUT/summary.txt" 2>&1
step warmup 150 python3 -c "from hetinfer import kernels; print(f'kernels ready in {kernels.warmup():.0f} s')"
if [[ $DEVICE == cuda ]]; then
  step tests 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_kernels_cuda.py tests/test_offload_gpu.py
  step kernels_gpu 120 python3 benchmarks/kernels_gpu.py --device cuda
  step hybrid 240 python3 benchmarks/hybrid.py --device cuda --shape llama2-7b --workdir /tmp --save "$OUT/hybrid.json"
  step hybrid13 240 python3 benchmarks/hybrid.py --device cuda --shape llama2-13b --workdir /tmp --save "$OUT/hybrid13.json"
else  # the stand-in: the same steps on tiny shapes, to check this script
  step tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_offload_gpu.py -m "not slow"
  step kernels_gpu 120 python3 benchmarks/kernels_gpu.py --device cpu --quick
  step hybrid 240 python3 benchmarks/hybrid.py --device cpu --shape tiny --tokens 8 --threads 2 --save "$OUT/hybrid.json"
fi
cat "$OUT/summary.txt"
