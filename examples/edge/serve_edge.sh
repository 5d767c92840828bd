#!/usr/bin/env bash
# Serve a model on an edge box within a memory budget: OpenAI-compatible API, loopback by default.
#
#   examples/edge/serve_edge.sh MODEL BUDGET          e.g.  serve_edge.sh ~/models/model.gguf 128MiB
#
# First `hetinfer prepare` makes a deployment of MODEL for BUDGET (profile, predictors, placement of
# every FFN neuron in RAM or on flash, the flash store); it skips the steps already done, so after the
# first start (minutes: profiling and predictor training) it takes seconds. Then `hetinfer serve`
# serves the deployment. BUDGET is RAM for model data (dense parts, RAM-tier neurons, window cache, KV
# cache); the runtime itself (Python, torch, numba) needs about 0.5 GiB more (see README.md).
#
# Settings come from the environment (see hetinfer.env): HETINFER (the hetinfer executable),
# HETINFER_STATE (where the deployment and the flash store live; default $STATE_DIRECTORY from
# systemd, else ~/.local/share/hetinfer), HETINFER_HOST (127.0.0.1), HETINFER_PORT (8000),
# HETINFER_CTX (1024; the KV cache grows with it), HETINFER_THREADS (default: the cores other
# processes leave free), HETINFER_PREPARE_ARGS (extra `hetinfer prepare` flags, e.g. --data FILE),
# HETINFER_API_KEY (read by `hetinfer serve` itself, so the key never shows in the process list) or
# HETINFER_API_KEY_FILE (a file holding the key, passed as --api-key-file).
set -euo pipefail
usage="usage: serve_edge.sh MODEL BUDGET (e.g. 256MiB)"
MODEL="${1:?$usage}"
BUDGET="${2:?$usage}"
HETINFER="${HETINFER:-hetinfer}"
STATE="${HETINFER_STATE:-${STATE_DIRECTORY:-$HOME/.local/share/hetinfer}}"
mkdir -p "$STATE/flash"
threads=()
if [[ -n "${HETINFER_THREADS:-}" ]]; then
  threads=(--threads "$HETINFER_THREADS")
fi
# shellcheck disable=SC2086  # HETINFER_PREPARE_ARGS holds several flags
"$HETINFER" prepare -m "$MODEL" -o "$STATE/deploy" --flash-dir "$STATE/flash" --ram "$BUDGET" \
  --ctx "${HETINFER_CTX:-1024}" "${threads[@]}" ${HETINFER_PREPARE_ARGS:-} >&2
key_file=()
if [[ -n "${HETINFER_API_KEY_FILE:-}" ]]; then
  key_file=(--api-key-file "$HETINFER_API_KEY_FILE")
fi
exec "$HETINFER" serve "$STATE/deploy" --host "${HETINFER_HOST:-127.0.0.1}" --port "${HETINFER_PORT:-8000}" \
  "${threads[@]}" "${key_file[@]}" --verbose
