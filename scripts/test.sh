#!/usr/bin/env bash
# The test command of the README: set up, build, run every test (GPU tests skip
# with a message where no GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ctest --test-dir build --output-on-failure -j "$(nproc)" --timeout 900 "$@"
