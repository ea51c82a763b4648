#!/usr/bin/env python3
"""Runs `dsv4 bench decode` on the CPU backend (tiny preset) and checks its JSON:
the bytes attributed to stages add up to the step's total, and each stage's
roofline and ratio follow from its bytes, the copy bandwidth and its eager time, and
the rows-per-expert histogram counts every routed slot, the build, the device and the DSV4_* switches set are recorded,
the stage breakdown comes from --eager-runs runs (5 by default), each run's total recorded;
the replay times are kept in order, and the clocks beside them say why there are none on the CPU;
with --position-spread the KV bytes are those of each row at its own position.
usage: check_bench_decode.py DSV4_BINARY TMP_DIR"""
import json
import os
import subprocess
import sys


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def main():
    binary, tmp = sys.argv[1], sys.argv[2]
    out = os.path.join(tmp, "bench_decode_%d.json" % os.getpid())
    cmd = [binary, "bench", "decode", "--backend", "cpu", "--preset", "tiny", "--random-weights", "1",
           "--batch", "1,3", "--context", "300", "--warmup", "1", "--replays", "2", "--json", out]
    # A switch of the CUDA backend (at its default; the CPU reads none): recorded with the results.
    env = dict(os.environ, DSV4_CUDA_LANES="3")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    print(run.stdout)
    if run.returncode != 0:
        fail("exit %d: %s" % (run.returncode, run.stderr[-2000:]))
    if run.stdout.count("stage ms / its roofline ms") != 2:
        fail("expected one per-stage roofline line per batch size")
    with open(out) as f:
        d = json.load(f)
    os.remove(out)
    if not d.get("device", {}).get("name") or d["device"]["name"] not in run.stderr:
        fail("the device is not recorded: JSON %s" % d.get("device"))
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    build = d.get("build", {})
    if not build.get("commit") or "commit %s" % build["commit"] not in version or "cuda" not in build:
        fail("the build is not recorded as --version says: JSON %s, --version %s" % (build, version))
    if d.get("environment", {}).get("DSV4_CUDA_LANES") != "3" or "bench decode: DSV4_CUDA_LANES=3" not in run.stderr:
        fail("the environment's switches not recorded: JSON %s, stderr %s" % (d.get("environment"), run.stderr[-500:]))
    bw = d["copy_bandwidth_gb_s"] * 1e9
    for r in d["results"]:
        b = r["batch_per_rank"]
        stages = r["stage_bytes_rank0"]
        if sum(stages.values()) != r["bytes_per_gpu"]["total"]:
            fail("batch %d: stage bytes %d != total %d" % (b, sum(stages.values()), r["bytes_per_gpu"]["total"]))
        for name in ("attn_in", "attn_q", "index_in", "attn_kv", "index_topk", "compress", "attn_core", "attn_out",
                     "router", "shared_expert", "experts", "logits", "embed"):
            if stages.get(name, 0) <= 0:
                fail("batch %d: no bytes for stage %s" % (b, name))
            roof = stages[name] / bw * 1e3
            if abs(r["stage_roofline_ms_rank0"][name] - roof) > 1e-9 * max(roof, 1.0):
                fail("batch %d: %s roofline %g, expected %g" % (b, name, r["stage_roofline_ms_rank0"][name], roof))
            ratio = r["stage_ms_eager_rank0"][name] / roof
            if abs(r["stage_ratio_to_roofline_eager_rank0"][name] - ratio) > 1e-6 * ratio:
                fail("batch %d: %s ratio %g, expected %g" % (b, name, r["stage_ratio_to_roofline_eager_rank0"][name],
                                                             ratio))
        # The replays in order, and the clocks beside them: the CPU backend has none, and says so.
        if len(r.get("step_ms_replays_rank0", [])) != r["timed_steps"] or \
                sorted(r["step_ms_replays_rank0"])[0] != r["step_ms_min"]:
            fail("batch %d: step_ms_replays_rank0 %s against timed_steps %s, min %s" %
                 (b, r.get("step_ms_replays_rank0"), r["timed_steps"], r["step_ms_min"]))
        clocks = r.get("clocks_during_replays_rank0", {})
        if clocks.get("source") != "unavailable" or "cpu backend has no GPU clocks" not in clocks.get("why", "") or \
                "clocks during the replays (rank 0): no clock readings (the cpu backend" not in run.stdout:
            fail("batch %d: the CPU's clocks: JSON %s" % (b, clocks))
        runs = r.get("eager_step_ms_runs_rank0", [])
        if r.get("eager_runs") != 5 or len(runs) != 5 or min(runs) <= 0:
            fail("batch %d: expected 5 eager runs (the default), each with a positive total: %s runs, totals %s" %
                 (b, r.get("eager_runs"), runs))
        # The routing's load: every (row, slot) of every layer counted once (tiny: 4 layers, top-2),
        # and the (layer, expert) pairs are the touched experts.
        hist = r["expert_rows_histogram_rank0"]
        if sum(n * count for n, count in hist) != b * 2 * 4:
            fail("batch %d: expert rows histogram %s holds %d slots, expected %d" %
                 (b, hist, sum(n * count for n, count in hist), b * 2 * 4))
        if any(n < 1 or n > b for n, _ in hist) or [n for n, _ in hist] != sorted(n for n, _ in hist):
            fail("batch %d: expert rows histogram %s: rows outside 1..%d or out of order" % (b, hist, b))
        if sum(count for _, count in hist) != r["bytes_per_gpu"]["experts_touched"]:
            fail("batch %d: histogram pairs %d != experts touched %d" %
                 (b, sum(count for _, count in hist), r["bytes_per_gpu"]["experts_touched"]))
    print("ok: %d batch sizes, stage bytes add up, the routing's load is whole" % len(d["results"]))

    # --position-spread: sequence s decodes at --context - (s mod N), so a step's KV bytes
    # are the sum of one-row steps' at those positions (positions 300, 299, 298 here).
    def kv_bytes(batch, context, spread):
        path = os.path.join(tmp, "bench_decode_spread_%d.json" % os.getpid())
        args = [binary, "bench", "decode", "--backend", "cpu", "--preset", "tiny", "--random-weights", "1",
                "--batch", str(batch), "--context", str(context), "--position-spread", str(spread), "--warmup", "1",
                "--replays", "1", "--eager-runs", "1", "--json", path]
        r = subprocess.run(args, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            fail("%s: exit %d: %s" % (" ".join(args[1:]), r.returncode, r.stderr[-2000:]))
        with open(path) as f:
            res = json.load(f)["results"][0]
        os.remove(path)
        if res["eager_runs"] != 1 or len(res["eager_step_ms_runs_rank0"]) != 1:
            fail("--eager-runs 1: %s runs, totals %s" % (res["eager_runs"], res["eager_step_ms_runs_rank0"]))
        if res["position_spread"] != spread:
            fail("position_spread %s in the JSON, expected %d" % (res["position_spread"], spread))
        return res["bytes_per_gpu"]["kv"]
    spread = kv_bytes(3, 300, 4)
    single = sum(kv_bytes(1, p, 1) for p in (300, 299, 298))
    if spread != single:
        fail("--position-spread 4, 3 rows at 300: KV bytes %d, the rows alone at 300, 299, 298 add to %d" %
             (spread, single))
    bad = subprocess.run([binary, "bench", "decode", "--backend", "cpu", "--preset", "tiny", "--context", "10",
                          "--position-spread", "11"], capture_output=True, text=True, timeout=60)
    if bad.returncode == 0 or "--position-spread 11 exceeds --context 10" not in bad.stderr:
        fail("--position-spread above --context: exit %d, %s" % (bad.returncode, bad.stderr[-500:]))
    print("ok: --position-spread's KV bytes are the rows' own")
    bad = subprocess.run([binary, "bench", "decode", "--backend", "cpu", "--preset", "tiny", "--eager-runs", "0"],
                         capture_output=True, text=True, timeout=60)
    if bad.returncode == 0 or "--eager-runs" not in bad.stderr:
        fail("--eager-runs 0: exit %d, %s" % (bad.returncode, bad.stderr[-500:]))
    print("ok: --eager-runs")


if __name__ == "__main__":
    main()
