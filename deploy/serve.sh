#!/usr/bin/env bash
# Serve a model with UniSparse prefill through vLLM's OpenAI-compatible API.
#   deploy/serve.sh MODEL [PROFILE.yaml] [extra vllm serve args...]
# The profile is validated before vLLM starts. /metrics shows the unisparse:* counters of
# the engine process through a Prometheus multiprocess directory (a fresh one unless
# PROMETHEUS_MULTIPROC_DIR is set).
set -euo pipefail
model=${1:?usage: deploy/serve.sh MODEL [PROFILE.yaml] [vllm args...]}
profile=${2:-$(dirname "$0")/profile-example.yaml}
shift $(( $# >= 2 ? 2 : 1 ))
unisparse config validate "$profile"
export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-$(mktemp -d -t unisparse-metrics.XXXXXX)}
exec vllm serve "$model" --attention-backend unisparse \
    --additional-config "{\"unisparse\": {\"profile\": \"$profile\"}}" "$@"
