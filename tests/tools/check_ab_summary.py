#!/usr/bin/env python3
"""Checks scripts/ab_summary.py on made-up runs whose answer is known: the mean step over the rounds, the change
against base, "apart" only where every round of the variant lies beyond every round of base, the change per GB
where the variant moved other bytes, each variant's device and switches, and the warning when runs were on
different devices; and for runs of `bench sampling`, the mean backend ms per row count and sampler, its change and
"apart", and the refusal of a folder that mixes both benches.
usage: check_ab_summary.py SUMMARY_SCRIPT TMP_DIR"""
import json
import os
import shutil
import subprocess

from check_common import fail, target_and_stem


def write_run(folder, name, rnd, steps_ms, gb, device="NVIDIA H200", env=None):
    """One NAME-ROUND.json: batches 1 and 16 with these step times and GB moved at 4000 GB/s."""
    results = []
    for batch, ms, g in zip((1, 16), steps_ms, gb):
        roof = g / 4000.0 * 1000.0  # ms
        results.append({"batch_per_rank": batch, "roofline_ms": roof, "ratio_to_roofline": ms / roof})
    with open(os.path.join(folder, "%s-%d.json" % (name, rnd)), "w") as f:
        json.dump({"copy_bandwidth_gb_s": 4000.0, "results": results, "device": {"name": device},
                   "environment": env or {}}, f)


def write_sampling_run(folder, name, rnd, top_p_ms, argmax_ms=0.02):
    """One NAME-ROUND.json of bench sampling: 1 and 16 rows, a top_p sampler with these backend times."""
    results = [{"rows": rows, "backend_argmax_ms": argmax_ms,
                "samplers": [{"sampler": "top_p 0.95 T 1", "backend_ms": ms, "one_thread_ms": 1.0, "pool_ms": 1.0}],
                "logprobs_top5": {"backend_ms": 0.1}} for rows, ms in zip((1, 16), top_p_ms)]
    with open(os.path.join(folder, "%s-%d.json" % (name, rnd)), "w") as f:
        json.dump({"backend": "cuda", "results": results, "device": {"name": "NVIDIA H100"}, "environment": {}}, f)


def rows(text):
    """{(variant, batch): [the row's fields]} of the table."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5 and f[1].isdigit():
            out[(f[0], int(f[1]))] = f
    return out


def main():
    script, stem = target_and_stem("ab_summary_check")
    os.makedirs(stem)
    # base: 1.00 / 1.02 ms at batch 1, 3.00 / 3.06 at 16; fast: every round below base at 1 (apart), one round
    # inside base's spread at 16; its batch 16 moved 10% more bytes (per GB: (3.03 / 11) / (3.03 / 10) - 1 = -9.1%).
    write_run(stem, "base", 1, (1.00, 3.00), (2.0, 10.0))
    write_run(stem, "base", 2, (1.02, 3.06), (2.0, 10.0))
    write_run(stem, "fast", 1, (0.90, 3.01), (2.0, 11.0), env={"DSV4_CUDA_TMA": "0"})
    write_run(stem, "fast", 2, (0.94, 3.05), (2.0, 11.0), env={"DSV4_CUDA_TMA": "0"})
    out = subprocess.run(["python3", script, stem], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        fail("exit %d: %s" % (out.returncode, out.stderr))
    t = rows(out.stdout)
    expect = {("base", 1): ["1.010", None, None], ("base", 16): ["3.030", None, None],
              ("fast", 1): ["0.920", "-8.9%", "yes"], ("fast", 16): ["3.030", "+0.0%", "no"]}
    for key, (mean, change, apart) in expect.items():
        if key not in t:
            fail("no row for %s in:\n%s" % (key, out.stdout))
        f = t[key]
        if f[2] != mean or (change and (f[3] != change or f[5] != apart)):
            fail("row %s is %s; expected mean %s, change %s, apart %s" % (key, f, mean, change, apart))
    if t[("fast", 16)][-1] != "-9.1%":
        fail("per GB at 16 rows: %s, expected -9.1%%" % t[("fast", 16)][-1])
    if "fast           on NVIDIA H200: DSV4_CUDA_TMA=0" not in out.stdout or "WARNING" in out.stdout:
        fail("the variants' settings are not shown as expected:\n" + out.stdout)
    # A variant's runs on another device: said before the table.
    write_run(stem, "other", 1, (1.0, 3.0), (2.0, 10.0), device="NVIDIA H100")
    out = subprocess.run(["python3", script, stem], capture_output=True, text=True, timeout=60)
    if "WARNING: the runs were on different devices (NVIDIA H100, NVIDIA H200)" not in out.stdout:
        fail("no warning for runs on two devices:\n" + out.stdout)
    shutil.rmtree(stem)

    # bench sampling: base 0.30 / 0.32 ms at one row, 0.40 / 0.44 at 16; fast 0.12 / 0.13 (apart, -59.7%) and
    # 0.41 / 0.45 (inside base's spread: +2.4%, not apart).
    os.makedirs(stem)
    write_sampling_run(stem, "base", 1, (0.30, 0.40))
    write_sampling_run(stem, "base", 2, (0.32, 0.44))
    write_sampling_run(stem, "fast", 1, (0.12, 0.41))
    write_sampling_run(stem, "fast", 2, (0.13, 0.45))
    out = subprocess.run(["python3", script, stem], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        fail("sampling runs: exit %d: %s" % (out.returncode, out.stderr))
    got = {}
    for line in out.stdout.splitlines():
        m = line.split()
        if len(m) >= 4 and m[1].isdigit() and "top_p" in line:
            got[(m[0], int(m[1]))] = line.split("T 1")[1].split()
    want = {("base", 1): ["0.310"], ("base", 16): ["0.420"], ("fast", 1): ["0.125", "-59.7%", "yes"],
            ("fast", 16): ["0.430", "+2.4%", "no"]}
    if got != want:
        fail("sampling rows %s, expected %s:\n%s" % (got, want, out.stdout))
    if "argmax" not in out.stdout or "logprobs top 5" not in out.stdout:
        fail("the argmax and log-probability rows are missing:\n" + out.stdout)
    write_run(stem, "other", 1, (1.0, 3.0), (2.0, 10.0))  # a bench decode run beside them
    out = subprocess.run(["python3", script, stem], capture_output=True, text=True, timeout=60)
    if out.returncode == 0 or "both bench decode and bench sampling" not in out.stderr:
        fail("a folder of both benches was summarized: rc %d, %s" % (out.returncode, out.stderr))
    shutil.rmtree(stem)
    print("PASS")


if __name__ == "__main__":
    main()
