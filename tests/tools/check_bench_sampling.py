#!/usr/bin/env python3
"""Runs `dsv4 bench sampling` on the CPU backend and checks its JSON: one entry per row
count with the host-path times and the six samplers, each on one thread, on the pool and on
the backend (the command itself fails if the backend's argmax, the pool's or the backend's
tokens differ from the host's). A bad row count must fail naming --rows. usage: check_bench_sampling.py DSV4_BINARY TMP_DIR"""
import json
import os
import subprocess

from check_common import expect_failure_naming, fail, target_and_stem


def run(binary, args):
    return subprocess.run([binary, "bench", "sampling", "--backend", "cpu"] + args, capture_output=True, text=True,
                          timeout=300)


def main():
    binary, stem = target_and_stem("bench_sampling")
    out = stem + ".json"
    r = run(binary, ["--rows", "1,5", "--vocab", "3001", "--replays", "2", "--json", out])
    print(r.stdout)
    if r.returncode != 0:
        fail("exit %d: %s" % (r.returncode, r.stderr[-2000:]))
    with open(out) as f:
        d = json.load(f)
    os.remove(out)
    if d["backend"] != "cpu" or d["vocab"] != 3001 or d["pool_threads"] < 1:
        fail("header: %s" % {k: d[k] for k in ("backend", "vocab", "pool_threads")})
    if [e["rows"] for e in d["results"]] != [1, 5]:
        fail("rows %s" % [e["rows"] for e in d["results"]])
    for e in d["results"]:
        for k in ("all_rows_to_host_ms", "all_rows_to_host_buffer_ms", "host_argmax_ms", "backend_argmax_ms"):
            if not e[k] >= 0:
                fail("rows %d: %s = %s" % (e["rows"], k, e[k]))
        if [s["sampler"] for s in e["samplers"]] != ["temperature 1", "top_k 50", "top_p 0.9", "top_p 0.95 T 1",
                                                 "k 40 p 0.9", "min_p 0.05 T 1"]:
            fail("rows %d: samplers %s" % (e["rows"], [s["sampler"] for s in e["samplers"]]))
        for s in e["samplers"]:
            if not (s["one_thread_ms"] > 0 and s["pool_ms"] > 0 and s["backend_ms"] > 0):
                fail("rows %d %s: %s" % (e["rows"], s["sampler"], s))
    if "commit" not in d["build"] or "name" not in json.dumps(d["device"]):
        fail("build or device record missing: %s %s" % (d["build"], d["device"]))
    expect_failure_naming(run(binary, ["--rows", "1,x"]), "--rows", "a bad row count")
    print("OK")


if __name__ == "__main__":
    main()
