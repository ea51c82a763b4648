#!/usr/bin/env bash
# A/B decode (or token-choice) benchmark on one machine: the working tree against variants of it,
# each variant the tree with a patch applied (e.g. one change reverted) or the
# tree's own binary under environment settings, benched alternately so that the
# machine's drift falls on both sides alike.
#
#   scripts/ab_bench.sh OUT NAME=PATCH|NAME=env:VAR=VALUE[,VAR=VALUE...] [...]
# (a comma not followed by VAR= belongs to the value: env:DSV4_REPEAT_OPS=grouped_linear,router
# sets one variable to "grouped_linear,router"; values hold no spaces). An env: variant whose
# DSV4_* name dsv4 does not read, or whose value a switch does not take (`dsv4 env` lists
# them), stops the A/B before the first run: it would measure the default under another name.
#
# PATCH is applied with `git apply` (forward) to a copy of the tree; to measure a
# change by its removal, pass its reverse: `git diff NEW OLD -- FILES > rev.patch`.
# env: variants need no build (e.g. off=env:DSV4_CUDA_SHARED_DECODE=0).
# The tree itself is built in build-gpu (as scripts/gpu_suite.sh does), each
# variant in /tmp/ab_NAME/b. Writes OUT/NAME-ROUND.json (the bench's JSON) and
# prints step ms (median of the graph replays) per batch for every run, then
# scripts/ab_summary.py's table (means, change against base, ratio to the roofline,
# GB moved and the change per GB, the fair one where a variant changes bits;
# OUT must hold no runs yet: the summary reads every NAME-ROUND.json there).
# Environment: ROUNDS (default 2), BATCHES (default 1,16,64,256), PRESET (default
# bench-1g), CONTEXT (default 4096), CMAKE_ARGS (default -DDSV4_CUDA=ON), BENCH_ARGS
# (more `bench decode` options, e.g. "--backend cpu --threads 8" for a CPU run).
# BENCH=sampling runs `bench sampling --rows ROWS --replays REPLAYS BENCH_ARGS` instead (ROWS
# default 1,16,64,256, REPLAYS 5): each run prints top_p 0.95's backend ms per row count, and the
# summary compares every sampler's backend time (the choices up, the launch, the ids down).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/ab_bench.sh OUT NAME=PATCH [NAME=PATCH...]}"
shift
[ $# -gt 0 ] || { echo "ab_bench: give at least one NAME=PATCH variant" >&2; exit 2; }
mkdir -p "$out"
# (a second A/B into the same OUT would be summarized together with the first's runs)
if compgen -G "$out/*-[0-9]*.json" >/dev/null; then
  echo "ab_bench: $out already holds runs (NAME-ROUND.json); give a fresh OUT: the summary reads every one there" >&2
  exit 2
fi
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$PWD/.carry/lib"
export LIBRARY_PATH="${LIBRARY_PATH:+$LIBRARY_PATH:}$PWD/.carry/lib"
read -r -a cmake_args <<<"${CMAKE_ARGS:--DDSV4_CUDA=ON}"
read -r -a bench_args <<<"${BENCH_ARGS:-}"
rounds="${ROUNDS:-2}"
bench="${BENCH:-decode}"
case "$bench" in  # (checked before the builds)
  decode)
    bench_cmd=(bench decode --preset "${PRESET:-bench-1g}" --random-weights 1 --batch "${BATCHES:-1,16,64,256}"
               --context "${CONTEXT:-4096}")
    header="run            step ms at batch ${BATCHES:-1,16,64,256} (copy GB/s)" ;;
  sampling)
    bench_cmd=(bench sampling --rows "${ROWS:-1,16,64,256}" --replays "${REPLAYS:-5}")
    header="run            top_p 0.95 at T 1, backend ms at rows ${ROWS:-1,16,64,256}" ;;
  *) echo "ab_bench: BENCH='$bench' is not decode or sampling" >&2; exit 2 ;;
esac

build() {  # build SRC_DIR BUILD_DIR LOG
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}" >"$3" 2>&1 &&
    cmake --build "$2" -j "$(nproc)" --target dsv4 >>"$3" 2>&1 ||
    { echo "ab_bench: build of $1 failed, tail of $3:" >&2; tail -n 20 "$3" >&2; exit 1; }
}

env_re='^[A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*$'
for v in "$@"; do  # every variant checked before the first build
  name="${v%%=*}" spec="${v#*=}"
  if [ -n "$name" ] && [ "$name" != "$v" ] && [ "${spec#env:}" != "$spec" ]; then
    [[ "${spec#env:}" =~ $env_re ]] || { echo "ab_bench: bad variant '$v' (NAME=env:VAR=VALUE[,VAR=VALUE...])" >&2; exit 2; }
  else
    [ -n "$name" ] && [ "$name" != "$v" ] && [ -f "$spec" ] ||
      { echo "ab_bench: bad variant '$v' (NAME=PATCH, PATCH a file, or NAME=env:VAR=VALUE)" >&2; exit 2; }
  fi
done

names=(base)
build_pids=()
bins=("$PWD/build-gpu/tools/dsv4")
envs=("")
echo "building the tree in build-gpu"
build . build-gpu "$out/build-base.log"
for v in "$@"; do
  name="${v%%=*}" patch="${v#*=}"
  if [ "${patch#env:}" != "$patch" ]; then  # the tree's binary under these settings
    settings="${patch#env:}"
    names+=("$name")
    bins+=("$PWD/build-gpu/tools/dsv4")
    envs+=("$(sed -E 's/,([A-Za-z_][A-Za-z0-9_]*=)/ \1/g' <<<"$settings")")
    continue
  fi
  src="/tmp/ab_$name"
  rm -rf "$src" && mkdir -p "$src"
  tar cf - --exclude=./build --exclude=./build-gpu --exclude=./.git . | tar xf - -C "$src"
  patch_abs="$(cd "$(dirname "$patch")" && pwd)/$(basename "$patch")"
  (cd "$src" && git apply "$patch_abs") || { echo "ab_bench: $patch does not apply to the tree" >&2; exit 1; }
  echo "building variant $name ($patch)"
  # Variants build side by side: each build's wall time is set by a few large .cu files,
  # so one build leaves most cores idle.
  build "$src" "$src/b" "$out/build-$name.log" &
  build_pids+=($!)
  names+=("$name")
  bins+=("$src/b/tools/dsv4")
  envs+=("")
done
for pid in ${build_pids[@]+"${build_pids[@]}"}; do
  wait "$pid" || { echo "ab_bench: a variant's build failed (see the message above)" >&2; exit 1; }
done

for i in "${!names[@]}"; do  # a misspelt switch would bench the default as a variant
  [ -n "${envs[$i]}" ] || continue
  read -r -a vars <<<"${envs[$i]}"
  warned="$(env "${vars[@]}" "${bins[$i]}" env --set 2>&1 >/dev/null)"
  [ -z "$warned" ] || { echo "ab_bench: variant ${names[$i]} (${envs[$i]}):" >&2; echo "$warned" >&2; exit 2; }
done

echo "$header"
for ((r = 1; r <= rounds; ++r)); do
  for i in "${!names[@]}"; do
    json="$out/${names[$i]}-$r.json"
    read -r -a vars <<<"${envs[$i]}"
    env ${vars[@]+"${vars[@]}"} "${bins[$i]}" "${bench_cmd[@]}" ${bench_args[@]+"${bench_args[@]}"} --json "$json" \
      >"$out/${names[$i]}-$r.log" 2>&1 ||
      { echo "ab_bench: bench of ${names[$i]} failed, see $out/${names[$i]}-$r.log" >&2; exit 1; }
    python3 - "$json" "${names[$i]}-$r" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if "copy_bandwidth_gb_s" in d:  # bench decode
    ms = " ".join("%.3f" % (r["roofline_ms"] * r["ratio_to_roofline"]) for r in d["results"])
    print("%-14s %s (%.0f)" % (sys.argv[2], ms, d["copy_bandwidth_gb_s"]))
else:  # bench sampling
    ms = " ".join("%.3f" % s["backend_ms"] for r in d["results"] for s in r["samplers"] if s["sampler"] == "top_p 0.95 T 1")
    print("%-14s %s" % (sys.argv[2], ms))
EOF
  done
done
echo
python3 scripts/ab_summary.py "$out"
