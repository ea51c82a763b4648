#!/usr/bin/env bash
# The main job of the README: set up, build, write the `tiny` checkpoint and
# generate from it on the CPU reference backend (no GPU, no download beyond the
# package registries).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
model=build/models/tiny
if [ ! -f "$model/model.safetensors.index.json" ]; then
  build/tools/dsv4 make-checkpoint --preset tiny --seed 0 --out "$model"
fi
echo "dsv4 generate --model $model --backend cpu --prompt-ids 0,17,42 --prompt-ids 0,1000,2000,3000 --max-new-tokens 16"
build/tools/dsv4 generate --model "$model" --backend cpu --prompt-ids 0,17,42 --prompt-ids 0,1000,2000,3000 \
  --max-new-tokens 16 --temperature 0
