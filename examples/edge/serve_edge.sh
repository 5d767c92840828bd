#!/usr/bin/env bash
# Serve a model on an edge box within a memory budget: OpenAI-compatible API, loopback by default.
#
#   examples/edge/serve_edge.sh MODEL BUDGET          e.g.  serve_edge.sh ~/models/model.gguf 1GiB
#
# Settings come from the environment (see hetinfer.env): HETINFER (the hetinfer executable),
# HETINFER_HOST (127.0.0.1), HETINFER_PORT (8000), HETINFER_CTX (2048; the KV cache grows with it),
# HETINFER_THREADS (default: all cores), HETINFER_API_KEY (read by `hetinfer serve` itself, so the
# key never shows in the process list).
#
# PENDING (offloading engine): a deployment step will go here, preparing MODEL for BUDGET (profile,
# place neurons across RAM and flash, write the flash store), and the server will then serve that
# deployment directory. Until it exists the dense engine keeps the whole model and KV cache in RAM,
# and `hetinfer serve --memory-budget` refuses to start when they do not fit in BUDGET.
set -euo pipefail
usage="usage: serve_edge.sh MODEL BUDGET (e.g. 1GiB)"
MODEL="${1:?$usage}"
BUDGET="${2:?$usage}"
args=(serve "$MODEL" --memory-budget "$BUDGET" --host "${HETINFER_HOST:-127.0.0.1}"
      --port "${HETINFER_PORT:-8000}" --ctx "${HETINFER_CTX:-2048}" --verbose)
if [[ -n "${HETINFER_THREADS:-}" ]]; then
  args+=(--threads "$HETINFER_THREADS")
fi
exec "${HETINFER:-hetinfer}" "${args[@]}"
