#!/usr/bin/env python3
"""Checks scripts/ab_summary.py on made-up runs whose answer is known: the mean step over the rounds, the change
against base, "apart" only where every round of the variant lies beyond every round of base, the change per GB
where the variant moved other bytes, each variant's device and switches, and the warning when runs were on
different devices.
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
    print("PASS")


if __name__ == "__main__":
    main()
