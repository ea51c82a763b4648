#!/usr/bin/env bash
# The GPU checks and benchmarks, run on a Hopper machine (one or two GPUs):
#   scripts/gpu_suite.sh OUT_DIR STEP...
# Steps: build, tests, parity, dp, multinode, bench1, bench2, serve, profile, ncu-kernel, trace, cta-probe, memcheck
# (in the order given).
# Environment: GPU_TESTS_REGEX (ctest -R), GPU_TESTS_J (ctest -j: tests sharing the GPU, default 1), BENCH2_BATCHES, PROFILE_BATCHES, NCU_CLOCK (ncu --clock-control:
# base, the default, or none: the clocks the GPU runs at), NCU_CACHE (ncu --cache-control: all, the default,
# flushes the caches before each kernel; none keeps what the previous kernel left in L2, as in a step, but only for
# the first of ncu's replay passes: under ncu-kernel's --set full a launch whose bytes fit in L2 reads them from L2
# in every later pass, so its durations and DRAM rates are L2-warm), NCU_KERNEL,
# NCU_BATCHES, NCU_SKIP, NCU_COUNT, NCU_NAME_BASE (ncu-kernel: which launches of which kernel, matched against the
# name without (function, the default) or with (demangled) its template arguments; default the 5th and 6th expert GEMM
# launches at batch 16 and 256; its NCU_CLOCK and NCU_CACHE default to none), MEMCHECK_S (time limit),
# MEMCHECK_FILTER (gtest filter of the memcheck over cuda_ops_test; unset: every op test and every cuda_model_test
# test), MEMCHECK_SHARDS (memcheck: gtest shards run side by side a test binary, default 1), TRACE_BATCHES (trace:
# batch sizes, default "1 16 64 256"), TRACE_ARGS (trace: more `bench decode` options, e.g. "--position-spread 128"), TRACE_CONTEXT (trace: its
# --context, default 4096; 4095 completes a row in every compressor at batch 1), CUPTI_ROOT (trace: where CUPTI's headers and library are, if not found), PROBE_BATCHES (cta-probe:
# batch sizes, default "1 16 256"), PROBE_CONTEXT and PROBE_ARGS (cta-probe: as TRACE_CONTEXT and TRACE_ARGS), DSV4_COMMIT (the commit to report).
# Every step writes its logs to a work folder and a PASS/FAIL/SKIP line to its
# summary.txt; a failing step does not stop the next one. OUT_DIR receives
# summary.txt and logs.tgz (everything) as each step ends.
# A split-form httplib (Debian's) and its libraries may be carried in .carry/ (scripts/prepare_carry.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${1:?usage: scripts/gpu_suite.sh OUT_DIR STEP...}"
shift
out=/tmp/dsv4_gpu_suite
rm -rf "$out"
mkdir -p "$out" "$dest"
publish() {
  cp "$out/summary.txt" "$dest/" 2>/dev/null
  tar czf "$dest/logs.tgz" -C "$out" . 2>/dev/null
}
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$PWD/.carry/lib"
export LIBRARY_PATH="${LIBRARY_PATH:+$LIBRARY_PATH:}$PWD/.carry/lib"
export NCCL_NVLS_ENABLE=0
B=build-gpu
D=$B/tools/dsv4
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)

note() { echo "$*" | tee -a "$out/summary.txt"; }
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$out/$name.log" 2>"$out/$name.err"; then
    note "PASS $name ($((SECONDS - t0)) s)"
  else
    note "FAIL $name rc=$? ($((SECONDS - t0)) s): tail of $name.log and $name.err:"
    tail -n 25 "$out/$name.log" "$out/$name.err" | sed 's/^/    /' | tee -a "$out/summary.txt"
  fi
}

for s in "$@"; do
  case "$s" in
    build)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
        >>"$out/summary.txt" 2>&1
      note "commit ${DSV4_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
      step configure 300 cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA=ON
      step build 600 cmake --build $B -j "$(nproc)"
      [ -x "$D" ] && note "$("$D" --version 2>&1)"  # (the commit as built, and whether the tree had local changes)
      ;;
    tests)  # every GPU test: op-vs-reference matrix, model parity, graph == eager, NCCL, kill test
      step gpu-tests 600 ctest --test-dir $B -L gpu -R "${GPU_TESTS_REGEX:-.}" -j "${GPU_TESTS_J:-1}" --no-tests=error \
        --output-on-failure --timeout 400
      ;;
    parity)  # the CLI on CUDA against the CPU reference: greedy ids of 4 prompts (one > 300 tokens)
      ids=$(python3 -c "import random; r=random.Random(7); print(','.join(str(r.randrange(129280)) for _ in range(310)))")
      args=(--preset tiny --random-weights 1 --prompt-ids 0,17,42 --prompt-ids 5,6,7,8,9,10,11 --prompt-ids "$ids"
            --prompt-ids 100,200,300,400,500 --max-new-tokens 64 --temperature 0)
      step parity-cpu 300 $D generate --backend cpu --threads 8 "${args[@]}"
      step parity-cpu-hopper 300 $D generate --backend cpu --threads 8 --cpu-quant-dot hopper "${args[@]}"
      step parity-cuda 300 $D generate --backend cuda "${args[@]}"
      # The check: against the CPU run in the CUDA kernels' arithmetic (--cpu-quant-dot hopper: tensor-core sums,
      # K slices), which must give the same ids. Against the fp32 reference (the spec's arithmetic) the ids part
      # after a few tokens (FP8 rounding flips amplify last-bit differences), reported as INFO.
      for ref in cpu cpu-hopper; do
        if [ -s "$out/parity-$ref.log" ] && cmp -s "$out/parity-$ref.log" "$out/parity-cuda.log"; then
          note "PASS parity ($ref): CUDA greedy ids == CPU greedy ids (4 prompts x 64 tokens)"
        else
          agree=$(python3 -c "
import sys
a = [l.split() for l in open(sys.argv[1]) if l.strip()]
b = [l.split() for l in open(sys.argv[2]) if l.strip()]
def prefix(x, y):
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]: n += 1
    return n
print(' '.join(str(prefix(x, y)) for x, y in zip(a, b)))" "$out/parity-$ref.log" "$out/parity-cuda.log" 2>&1)
          verdict=FAIL
          [ "$ref" = cpu ] && verdict=INFO
          note "$verdict parity ($ref): CUDA and CPU greedy ids differ; tokens agreeing per prompt: $agree of 64"
        fi
      done
      ;;
    dp)  # --dp 2 with NCCL against one GPU: all-to-all bit for bit, all-gather within fp32 rounding
      if [ "$gpus" -lt 2 ]; then note "SKIP dp: needs 2 GPUs, have $gpus"; continue; fi
      args=(--preset tiny --random-weights 1 --prompt-ids 0,17,42 --prompt-ids 5,6,7,8,9,10,11,12,13
            --prompt-ids 100,200,300 --prompt-ids 9,8,7 --prompt-ids 1,2 --max-new-tokens 100 --temperature 0)
      step dp1 300 $D generate --backend cuda --dp 1 --no-cuda-graphs "${args[@]}" --dump-logits /tmp/dp1.npy
      step dp2-alltoall 300 $D generate --backend cuda --dp 2 --enable-expert-parallel --moe alltoall "${args[@]}" \
        --dump-logits /tmp/dp2a.npy
      step dp2-allgather 300 $D generate --backend cuda --dp 2 --enable-expert-parallel --moe allgather "${args[@]}" \
        --dump-logits /tmp/dp2g.npy
      if cmp -s /tmp/dp1.npy /tmp/dp2a.npy; then note "PASS dp2 alltoall logits == dp1 bit for bit (5 seqs x 100)"
      else note "FAIL dp2 alltoall logits differ from dp1"; fi
      python3 -c "
import numpy as np
a, b = np.load('/tmp/dp1.npy'), np.load('/tmp/dp2g.npy')
print('dp2 allgather vs dp1: shape', a.shape, 'max abs diff', float(np.abs(a - b).max()), 'identical', bool((a == b).all()))
" 2>&1 | tee -a "$out/summary.txt"
      ;;
    multinode)  # two processes as two nodes (one GPU each, TCP bootstrap on localhost) against one GPU
      if [ "$gpus" -lt 2 ]; then note "SKIP multinode: needs 2 GPUs, have $gpus"; continue; fi
      common=(--preset tiny --random-weights 1 --max-new-tokens 100 --temperature 0 --backend cuda --dp 1
              --nnodes 2 --enable-expert-parallel --moe alltoall --master-addr 127.0.0.1 --master-port 29611
              --comm-timeout 60)
      # Node 1 gets fewer and shorter prompts: it runs idle steps while node 0 still has work.
      node0=(--prompt-ids 0,17,42 --prompt-ids 5,6,7,8,9,10,11,12,13 --prompt-ids 100,200,300)
      node1=(--prompt-ids 9,8,7 --prompt-ids 1,2)
      step mn-ref 300 $D generate --backend cuda --dp 1 --no-cuda-graphs --preset tiny --random-weights 1 \
        --max-new-tokens 100 --temperature 0 "${node0[@]}" "${node1[@]}" --dump-logits /tmp/mnref.npy
      CUDA_VISIBLE_DEVICES=1 timeout 300 $D generate "${common[@]}" --node-rank 1 "${node1[@]}" \
        --dump-logits /tmp/mn1.npy >"$out/mn-node1.log" 2>"$out/mn-node1.err" &
      node1_pid=$!
      step mn-node0 300 env CUDA_VISIBLE_DEVICES=0 $D generate "${common[@]}" --node-rank 0 "${node0[@]}" \
        --dump-logits /tmp/mn0.npy
      if wait $node1_pid; then note "PASS mn-node1"; else note "FAIL mn-node1: $(tail -n 5 "$out/mn-node1.err")"; fi
      cat "$out/mn-node0.log" "$out/mn-node1.log" >"$out/mn-both.log"
      if [ -s "$out/mn-ref.log" ] && cmp -s "$out/mn-ref.log" "$out/mn-both.log"; then
        note "PASS multinode: greedy ids of the two nodes == one GPU (5 prompts x 100 tokens)"
      else note "FAIL multinode: greedy ids differ from one GPU (mn-ref.log vs mn-both.log)"; fi
      python3 -c "
import numpy as np
a = np.load('/tmp/mnref.npy'); b = np.concatenate([np.load('/tmp/mn0.npy'), np.load('/tmp/mn1.npy')])
print('multinode logits vs one GPU: shape', a.shape, b.shape, 'identical', a.shape == b.shape and bool((a == b).all()))
" 2>&1 | tee -a "$out/summary.txt"
      ;;
    bench1)  # single-GPU decode against the roofline (issue 7)
      step bench-1g 500 $D bench decode --preset bench-1g --random-weights 1 --batch 1,16,64,256 --context 4096 \
        --json "$out/bench-1g.json"
      sed 's/^/    /' "$out/bench-1g.log" >>"$out/summary.txt"
      ;;
    bench2)  # 2-GPU decode, both MoE paths, communication share (issue 3)
      if [ "$gpus" -lt 2 ]; then note "SKIP bench2: needs 2 GPUs"; continue; fi
      for moe in allgather alltoall; do
        step bench-2g-$moe 500 $D bench decode --preset bench-2g --random-weights 1 --dp 2 --moe $moe \
          --batch "${BENCH2_BATCHES:-16,64,256,512}" --context 4096 --replays 50 --json "$out/bench-2g-$moe.json"
        sed 's/^/    /' "$out/bench-2g-$moe.log" >>"$out/summary.txt"
      done
      ;;
    serve)  # the server (2 GPUs: bench-2g expert parallel; 1 GPU: bench-1g), load from bench serve (issue 4)
      if [ ! -x $D ]; then note "SKIP serve: no dsv4 binary"; continue; fi
      if [ "$gpus" -ge 2 ]; then serve_args=(--preset bench-2g --dp 2 --moe allgather)
      else serve_args=(--preset bench-1g --dp 1); fi
      note "serve ${serve_args[*]}"
      $D serve "${serve_args[@]}" --random-weights 1 --backend cuda --port 8123 \
        --max-num-seqs 512 --max-model-len 2048 --kv-cache-memory 24G >"$out/serve-server.log" 2>&1 &
      server=$!
      for _ in $(seq 1 180); do curl -sf localhost:8123/health >/dev/null 2>&1 && break; sleep 1; done
      for c in ${SERVE_CONCURRENCY:-64 256 1024}; do
        step serve-c$c 200 $D bench serve --port 8123 --num-prompts $((c * 2)) --concurrency $c --input-len 256 \
          --output-len 64 --seed 1 --json "$out/serve-c$c.json"
        tail -n 30 "$out/serve-c$c.log" | sed 's/^/    /' >>"$out/summary.txt"
      done
      curl -s localhost:8123/metrics >"$out/serve-metrics.txt" 2>&1
      kill -INT $server; wait $server
      ;;
    profile)  # ncu: every kernel of one eager bench-1g decode step (time, DRAM bytes), batch 1 and 64
      for b in ${PROFILE_BATCHES:-1 64}; do
        step profile-b$b 300 ncu --profile-from-start off --clock-control "${NCU_CLOCK:-base}" \
          --cache-control "${NCU_CACHE:-all}" --csv --metrics \
          gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,launch__block_size \
          $D bench decode --preset bench-1g --random-weights 1 --batch $b --context 4096 --no-cuda-graphs \
          --replays 1 --warmup 0 --profile
      done
      ;;
    ncu-kernel)  # ncu --set full of a few launches of one kernel in an eager bench-1g step, per batch: the report,
                 # its details page and its source page (SASS, gzipped; scripts/ncu_source_summary.py reads it)
      for b in ${NCU_BATCHES:-16 256}; do
        step ncu-b$b 300 ncu --profile-from-start off --clock-control "${NCU_CLOCK:-none}" \
          --cache-control "${NCU_CACHE:-none}" --kernel-name-base "${NCU_NAME_BASE:-function}" \
          --kernel-name "regex:${NCU_KERNEL:-expert_gemm}" \
          --launch-skip "${NCU_SKIP:-4}" --launch-count "${NCU_COUNT:-2}" --set full --import-source no -f \
          -o "$out/ncu-b$b" $D bench decode --preset bench-1g --random-weights 1 --batch $b --context 4096 \
          --no-cuda-graphs --replays 1 --warmup 0 --profile
        ncu -i "$out/ncu-b$b.ncu-rep" --page details --csv >"$out/ncu-b$b-details.csv" 2>&1
        ncu -i "$out/ncu-b$b.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip >"$out/ncu-b$b-source.csv.gz"
        python3 scripts/ncu_source_summary.py --top 8 --ops 12 "$out/ncu-b$b-source.csv.gz" 2>&1 |
          sed 's/^/    /' >>"$out/summary.txt"
      done
      ;;
    trace)  # CUPTI kernel timeline of bench-1g graph replays (tools/graph_trace) per batch in TRACE_BATCHES:
            # where a replay's time goes, kernel by kernel, its critical chain by the captured graph's edges
            # (DSV4_GRAPH_EDGES; scripts/graph_trace_summary.py) and each node's cap (trace-caps-bN.tsv: what the
            # replay would gain were that node free)
      cupti_inc="" cupti_lib=""
      for root in ${CUPTI_ROOT:-} /usr/local/cuda/extras/CUPTI /usr/local/cuda \
        $(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null); do
        h=$(find -L "$root" -name cupti_activity.h 2>/dev/null | head -n 1)
        l=$(find -L "$root" -name 'libcupti.so*' 2>/dev/null | sort | head -n 1)
        if [ -n "$h" ] && [ -n "$l" ]; then cupti_inc=$(dirname "$h") cupti_lib=$l; break; fi
      done
      if [ -z "$cupti_inc" ]; then note "SKIP trace: no CUPTI headers and library found"; continue; fi
      record=$(grep -rhoE 'CUpti_ActivityKernel[0-9]+' "$cupti_inc" | sort -uV | tail -n 1)
      note "trace: CUPTI $cupti_lib, headers $cupti_inc, record $record"
      step trace-build 120 g++ -std=c++17 -O2 -shared -fPIC -I"$cupti_inc" -DGRAPH_TRACE_KERNEL_RECORD="$record" \
        tools/graph_trace/graph_trace.cpp "$cupti_lib" -Wl,-rpath,"$(dirname "$cupti_lib")" -o $B/graph_trace.so
      for b in ${TRACE_BATCHES:-1 16 64 256}; do
        rm -f "$out"/edges-b$b.*.tsv
        step trace-b$b 300 env LD_PRELOAD="$PWD/$B/graph_trace.so" DSV4_GRAPH_TRACE="$out/trace-b$b.tsv" \
          DSV4_GRAPH_EDGES="$out/edges-b$b" $D bench decode --preset bench-1g --random-weights 1 --batch $b --context ${TRACE_CONTEXT:-4096} --warmup 10 \
          --replays 60 ${TRACE_ARGS:-}
        step trace-summary-b$b 60 python3 scripts/graph_trace_summary.py "$out/trace-b$b.tsv" --last 50 \
          --nodes "$out/trace-nodes-b$b.tsv" --frontier "$out/trace-frontier-b$b.tsv" \
          --edges "$out"/edges-b$b.*.tsv --chain "$out/trace-chain-b$b.tsv" --caps "$out/trace-caps-b$b.tsv"
        { grep -A1 '^batch' "$out/trace-b$b.log"; head -n 40 "$out/trace-summary-b$b.log";
          awk '/^critical chain/ {p = 1} /^[|] node [|] kernel [|] self us/ {p = 0} p' "$out/trace-summary-b$b.log" |
            head -n 30;
          sed -n '/^| node | kernel | self us/,$p' "$out/trace-summary-b$b.log"; } | sed 's/^/    /' >>"$out/summary.txt"
        gzip -f "$out/trace-b$b.tsv"
      done
      ;;
    cta-probe)  # per-CTA clock stamps inside bench-1g graph replays (ops/cuda/cta_probe.h), from a build of its own
                # configured with -DDSV4_CUDA_CTA_PROBE=ON (build-probe; the dsv4 target only), per batch in PROBE_BATCHES
      step probe-configure 300 cmake -S . -B build-probe -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA=ON \
        -DDSV4_CUDA_CTA_PROBE=ON
      step probe-build 600 cmake --build build-probe -j "$(nproc)" --target dsv4
      for b in ${PROBE_BATCHES:-1 16 256}; do
        step probe-b$b 300 build-probe/tools/dsv4 bench decode --preset bench-1g --random-weights 1 --batch $b \
          --context ${PROBE_CONTEXT:-4096} --warmup 10 --replays 60 --cta-probe "$out/probe-b$b.tsv" ${PROBE_ARGS:-}
        step probe-summary-b$b 120 python3 scripts/cta_probe_summary.py "$out/probe-b$b.tsv"
        { grep -A1 '^batch' "$out/probe-b$b.log"; cat "$out/probe-summary-b$b.log"; } | sed 's/^/    /' >>"$out/summary.txt"
        gzip -f "$out/probe-b$b.tsv"
      done
      ;;
    memcheck)  # compute-sanitizer over the GPU op tests (with the default filter the model tests too) and one model run
      mc=(compute-sanitizer --tool memcheck --error-exitcode 1)
      shards=${MEMCHECK_SHARDS:-1}
      [[ "$shards" =~ ^[1-9][0-9]*$ ]] || { note "FAIL memcheck: MEMCHECK_SHARDS='$shards' is not a count"; shards=1; }
      # Shards (gtest's GTEST_TOTAL_SHARDS / GTEST_SHARD_INDEX) run side by side on the one GPU: the tests are small
      # and the sanitizer's host side is the bound (every op and model test: 84 s in 6 shards of the ops and 3 of the
      # model tests, H100, eighty-eighth session, against 269 and 55 s in one process each, eighty-fifth).
      tests=("ops:$B/tests/ops/cuda_ops_test:${MEMCHECK_FILTER:-*}")
      [ "${MEMCHECK_FILTER:-*}" = "*" ] && tests+=("model-tests:$B/tests/engine/cuda_model_test:*")
      for t in "${tests[@]}"; do
        IFS=: read -r name bin filter <<<"$t"
        if [ "$shards" -eq 1 ]; then
          step memcheck-$name ${MEMCHECK_S:-500} "${mc[@]}" "$bin" --gtest_filter="$filter"
          continue
        fi
        for ((i = 0; i < shards; ++i)); do
          step memcheck-$name-$i ${MEMCHECK_S:-500} env GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$i \
            "${mc[@]}" "$bin" --gtest_filter="$filter" &
        done
      done
      step memcheck-model 300 "${mc[@]}" $D generate --backend cuda \
        --preset tiny --random-weights 1 --prompt-ids 0,17,42 --prompt-ids 5,6,7,8 --max-new-tokens 8 --temperature 0
      wait
      cat "$out"/memcheck-*.log "$out"/memcheck-*.err 2>/dev/null | grep -h "ERROR SUMMARY" | sort | uniq -c |
        sed 's/^/    /' >>"$out/summary.txt"  # (one line a distinct summary, with its count of runs)
      ;;
    *) note "unknown step $s" ;;
  esac
  publish
done
