#!/usr/bin/env python3
"""Runs `dsv4 bench decode` on the CPU backend (tiny preset) and checks its JSON:
the bytes attributed to stages add up to the step's total, and each stage's
roofline and ratio follow from its bytes, the copy bandwidth and its eager time.
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
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(run.stdout)
    if run.returncode != 0:
        fail("exit %d: %s" % (run.returncode, run.stderr[-2000:]))
    if run.stdout.count("stage ms / its roofline ms") != 2:
        fail("expected one per-stage roofline line per batch size")
    with open(out) as f:
        d = json.load(f)
    os.remove(out)
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
    print("ok: %d batch sizes, stage bytes add up" % len(d["results"]))


if __name__ == "__main__":
    main()
