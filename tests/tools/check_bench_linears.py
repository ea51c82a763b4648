#!/usr/bin/env python3
"""Runs `dsv4 bench linears` on the CPU backend and checks its JSON: one result per
shape and row count, the bytes a linear moves (weight, block scales, activations,
output), the distinct weights the chain cycles through, and that the time above the
bytes follows from the time and the copy bandwidth; fp8-grouped (wo_a's form) reads
an input G times as wide. Bad shapes must fail naming --shapes; N no multiple of
the groups, and groups for another format, naming --groups. usage: check_bench_linears.py DSV4_BINARY TMP_DIR"""
import json
import math
import os
import subprocess
import sys

from check_common import expect_failure_naming, fail


def run(binary, args):
    return subprocess.run([binary, "bench", "linears", "--backend", "cpu"] + args, capture_output=True, text=True,
                          timeout=600)


def check(binary, tmp, fmt, shapes, rows, chain, pool, groups=1):
    out = os.path.join(tmp, "bench_linears_%s_%d.json" % (fmt, os.getpid()))
    r = run(binary, ["--format", fmt, "--shapes", ",".join("%dx%d" % s for s in shapes), "--rows",
                     ",".join(map(str, rows)), "--chain", str(chain), "--warmup", "1", "--replays", "2",
                     "--weights-bytes", str(pool), "--json", out] + (["--groups", str(groups)] if groups > 1 else []))
    print(r.stdout)
    if r.returncode != 0:
        fail("%s: exit %d: %s" % (fmt, r.returncode, r.stderr[-2000:]))
    with open(out) as f:
        d = json.load(f)
    os.remove(out)
    res = d["results"]
    if len(res) != len(shapes) * len(rows):
        fail("%s: %d results, expected %d" % (fmt, len(res), len(shapes) * len(rows)))
    bw = d["copy_bandwidth_gb_s"] * 1e9
    if bw <= 0:
        fail("%s: copy bandwidth %g" % (fmt, bw))
    if fmt == "fp8-grouped" and d.get("groups") != groups:
        fail("%s: groups %s, expected %d" % (fmt, d.get("groups"), groups))
    i = 0
    for n, k in shapes:
        fp8 = fmt in ("fp8", "fp8-grouped")
        w = n * k * (1 if fp8 else 2)
        scales = (n + 127) // 128 * (k // 128) if fp8 else 0
        for m in rows:
            e = res[i]
            i += 1
            if (e["n"], e["k"], e["rows"]) != (n, k, m):
                fail("%s: result %d is %dx%d rows %d" % (fmt, i, e["n"], e["k"], e["rows"]))
            want = w + scales + m * groups * k * 2 + m * n * 2  # the input is [m, groups * k]
            if e["bytes"] != want:
                fail("%s %dx%d rows %d: bytes %d, expected %d" % (fmt, n, k, m, e["bytes"], want))
            if e["distinct_weights"] != min(chain, math.ceil(pool / w)):
                fail("%s %dx%d: %d distinct weights" % (fmt, n, k, e["distinct_weights"]))
            if not e["us_per_linear"] > 0:
                fail("%s %dx%d rows %d: time %g" % (fmt, n, k, m, e["us_per_linear"]))
            above = e["us_per_linear"] - e["bytes"] / bw * 1e6
            if abs(above - e["us_above_bytes"]) > 1e-6 * max(1.0, abs(above)):
                fail("%s %dx%d rows %d: above %g, expected %g" % (fmt, n, k, m, e["us_above_bytes"], above))


def main():
    binary, tmp = sys.argv[1], sys.argv[2]
    os.makedirs(tmp, exist_ok=True)
    check(binary, tmp, "fp8", [(256, 256), (200, 384)], [1, 3], 3, 100000)
    check(binary, tmp, "bf16", [(128, 192)], [2], 4, 40000)
    check(binary, tmp, "fp8-grouped", [(256, 128)], [1, 2], 3, 40000, groups=2)
    expect_failure_naming(run(binary, ["--format", "fp8-grouped", "--groups", "3", "--shapes", "256x128"]),
                          "--groups", "N no multiple of the groups")
    expect_failure_naming(run(binary, ["--groups", "2", "--shapes", "256x128"]), "--groups", "groups for a plain format")
    expect_failure_naming(run(binary, ["--shapes", "256x100"]), "--shapes", "an FP8 K that is no multiple of 128")
    expect_failure_naming(run(binary, ["--rows", "1,x"]), "--rows", "a bad row count")
    print("OK")


if __name__ == "__main__":
    main()
