#!/usr/bin/env bash
# Fills .carry/ (gitignored) with what a GPU machine's build needs and that machine may lack:
# Debian's split-form cpp-httplib (header and library, for `dsv4 serve` and `bench serve`) and the
# brotli headers and libraries it is built against. CMake looks in .carry/include and .carry/lib
# first (src/serve/CMakeLists.txt); scripts/gpu_suite.sh and scripts/ab_bench.sh put .carry/lib on
# the library paths. Run it here (after scripts/setup.sh has installed libcpp-httplib-dev), then
# send .carry along with the tree to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
lib=/usr/lib/x86_64-linux-gnu
need() { [ -e "$1" ] || { echo "prepare_carry: $1 not found (apt-get install $2)" >&2; exit 1; }; }
need /usr/include/httplib.h libcpp-httplib-dev
need /usr/include/brotli/decode.h libbrotli-dev
need "$lib/libcpp-httplib.so" libcpp-httplib-dev
mkdir -p .carry/include .carry/lib
cp /usr/include/httplib.h .carry/include/
cp -r /usr/include/brotli .carry/include/
cp -a "$lib"/libcpp-httplib.so* .carry/lib/
for l in libbrotlidec.so.1 libbrotlienc.so.1 libbrotlicommon.so.1; do
  need "$lib/$l" libbrotli1
  cp -L "$lib/$l" .carry/lib/
done
echo "prepare_carry: .carry/ holds $(du -sh .carry | cut -f1) (httplib, brotli)"
