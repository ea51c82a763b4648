#!/usr/bin/env python3
"""Checks scripts/cta_probe_summary.py on made-up stamps whose answers are known: two launches of one
tag kept apart (each CTA's k-th entry is launch k), each launch's span, span from its first wait,
ramp and drain, the time after the launches before it, what ran beside its last CTA on that CTA's
SM, the last CTA's chain (medians over the launches), and the refusal of a file that is not a
--cta-probe file.
usage: check_cta_probe_summary.py SUMMARY_SCRIPT TMP_DIR"""
import csv
import os
import subprocess
import sys

from check_common import fail, target_and_stem


def main():
    script, base = target_and_stem("cta_probe_check")
    names = {0: "entry", 1: "waited", 2: "stages_done", 255: "exit"}
    # (cta, [(mark, ns)]) in the order the probe writes them: a CTA's stamps together, entry first.
    launch1 = [(0, [(0, 0), (1, 1000), (2, 5000), (255, 6000)]),
               (1, [(0, 200), (1, 1200), (255, 7000)]),
               (2, [(0, 400), (1, 1500), (255, 9000)])]
    launch2 = [(0, [(0, 20000), (1, 21000), (255, 25000)]),
               (1, [(0, 20100), (1, 21000), (255, 26000)]),
               (2, [(0, 20200), (1, 21000), (255, 27000)])]
    mix = [(0, [(0, 10000), (255, 12000)]), (1, [(0, 10100), (255, 12500)])]
    # One CTA on SM 2 while launch 1's last CTA (CTA 2, SM 2, 400-9000) runs.
    beside = [(2, [(0, 8000), (255, 8500)])]
    with open(base + ".tsv", "w") as f:
        f.write("batch\treplay\tsite\tmark\tmark_no\ttag\tcta\tsm\tns\tclock\n")
        for site, tag, launch in [("gemm_tile", "7f00b8000000", launch1), ("attention", "7f00bc000000", beside),
                                  ("hc_mix_finish", "7f00b4000000", mix), ("gemm_tile", "7f00b8000000", launch2)]:
            for cta, marks in launch:
                for m, ns in marks:
                    f.write(f"1\t0\t{site}\t{names[m]}\t{m}\t{tag}\t{cta}\t{cta}\t{ns}\t{2 * ns}\n")
    out = subprocess.run([sys.executable, script, base + ".tsv", "--launches", "5", "--csv", base + ".csv"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        fail("summary failed: " + out.stderr)
    rows = list(csv.DictReader(open(base + ".csv")))
    got = [(r["site"], r["kth"], r["ctas"], r["start_ns"], r["after_ns"], r["span_ns"], r["from_wait_ns"],
            r["ramp_ns"], r["drain_ns"], r["beside"]) for r in rows]
    # after: from the latest exit of the launches before (by first entry) to this one's first entry;
    # beside: the other launches' CTAs on the last CTA's SM while it ran
    want = [("gemm_tile", "0", "3", "0", "nan", "9000", "8000", "400", "8600", "attention 1"),
            ("attention", "0", "1", "8000", "-1000", "500", "nan", "0", "500", "gemm_tile 1"),
            ("hc_mix_finish", "0", "2", "10000", "1000", "2500", "nan", "100", "2400", ""),
            ("gemm_tile", "1", "3", "20000", "7500", "7000", "6000", "200", "6800", "")]
    if sorted(got) != sorted(want):
        fail(f"launches {got}, expected {want}")
    # The last CTA's chain, medians over the two gemm_tile launches: entry (400, 200), waited (1500, 1000),
    # exit (9000, 7000) from each launch's first entry.
    if "| gemm_tile | 3 | entry 0.30; waited 1.25; exit 8.00 |" not in out.stdout:
        fail("the last CTA's chain line is missing or wrong:\n" + out.stdout)
    with open(base + ".bad.tsv", "w") as f:
        f.write("graph\tnode\n1\t2\n")
    bad = subprocess.run([sys.executable, script, base + ".bad.tsv"], capture_output=True, text=True)
    if bad.returncode == 0 or "not a --cta-probe file" not in (bad.stdout + bad.stderr):
        fail("a file of other columns was not refused: " + bad.stdout + bad.stderr)
    for p in (".tsv", ".csv", ".bad.tsv"):
        os.remove(base + p)
    print("OK: two launches of one tag apart, spans, waits, ramps, drains and the last CTA's chain as expected")


if __name__ == "__main__":
    main()
