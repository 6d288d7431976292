#!/usr/bin/env bash
# Serve a model with UniSparse prefill through vLLM's OpenAI-compatible API.
#   deploy/serve.sh MODEL [PROFILE.yaml] [extra vllm serve args...]
set -euo pipefail
model=${1:?usage: deploy/serve.sh MODEL [PROFILE.yaml] [vllm args...]}
profile=${2:-$(dirname "$0")/profile-example.yaml}
shift $(( $# >= 2 ? 2 : 1 ))
unisparse config validate "$profile"
exec vllm serve "$model" --attention-backend unisparse \
    --additional-config "{\"unisparse\": {\"profile\": \"$profile\"}}" "$@"
