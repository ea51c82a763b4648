#!/usr/bin/env python3
"""Checks scripts/trace_chain_diff.py on two made-up chains with a known answer: the spans, the
totals by kernel (template arguments kept apart, or not with --bare), the alignment around a link
found on one chain only, the links that changed most, and clear errors on a file that is not a
chain and on bad options.
usage: check_trace_chain_diff.py DIFF_SCRIPT TMP_DIR"""
import subprocess
import sys

from check_common import fail, target_and_stem


def write_chain(path, links):
    """links: (kernel, link_us); ends accumulate from 0."""
    with open(path, "w") as f:
        f.write("start_us\tend_us\tlink_us\tedge_in\tkernel\n")
        end = 0.0
        for name, us in links:
            end += us
            f.write("%.2f\t%.2f\t%.2f\tprogrammatic\tvoid dsv4::ops::(anonymous namespace)::%s(Args, int)\n" %
                    (end - us - 1.0, end, us, name))


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60)


def main():
    script, base = target_and_stem("trace_chain_diff_check")
    a, b = base + ".a.tsv", base + ".b.tsv"
    # B: the second GEMM 1 us longer, the norm 1 us shorter (as norm_kernel<1>), a new link, the finisher 0.5 shorter.
    write_chain(a, [("embed_kernel<8>", 3.0), ("gemm_kernel<0, 1>", 4.0), ("norm_kernel<0>", 2.0),
                    ("gemm_kernel<0, 1>", 10.0), ("finish_kernel<4>", 8.0)])
    write_chain(b, [("embed_kernel<8>", 3.0), ("gemm_kernel<0, 1>", 4.0), ("norm_kernel<1>", 1.0),
                    ("gemm_kernel<0, 1>", 11.0), ("extra_kernel", 2.0), ("finish_kernel<4>", 7.5)])
    r = run(script, a, b, "--labels", "old,new", "--top", "2")
    print(r.stdout)
    if r.returncode != 0:
        fail("exit %d: %s" % (r.returncode, r.stderr))
    out = r.stdout
    want = [
        "span: old 27.0 us (5 links), new 28.5 us (6 links): +1.5 us (+5.6%)",
        "| gemm_kernel<0, 1> | 2 | 14.0 | 2 | 15.0 | +1.0 |",
        "| norm_kernel<0> | 1 | 2.0 | 0 | 0.0 | -2.0 |",
        "| extra_kernel | 0 | 0.0 | 1 | 2.0 | +2.0 |",
        "4 links aligned by kernel; the 2 that changed most",
        "| 3 | 3 | gemm_kernel<0, 1> | 10.00 | 11.00 | +1.00 |",
        "| 4 | 5 | finish_kernel<4> | 8.00 | 7.50 | -0.50 |",
        "| new | 4 | extra_kernel | 2.00 |",
        "| old | 2 | norm_kernel<0> | 2.00 |",
    ]
    for line in want:
        if line not in out:
            fail("expected the line %r" % line)
    # The first two aligned links did not change, so they are not among the top 2.
    if "| 0 | 0 | embed_kernel<8>" in out:
        fail("an unchanged link listed among the 2 that changed most")
    # --bare aligns norm_kernel<0> with norm_kernel<1>.
    r = run(script, a, b, "--bare", "--top", "5")
    if r.returncode != 0 or "| 2 | 2 | norm_kernel | 2.00 | 1.00 | -1.00 |" not in r.stdout or \
            "5 links aligned by kernel" not in r.stdout:
        fail("--bare did not align the norms: %s %s" % (r.stdout, r.stderr))
    # Not a chain file, a missing file, bad options: errors that name them.
    bad = base + ".bad.tsv"
    with open(bad, "w") as f:
        f.write("graph\tnode\tname\n3\t1\tx\n")
    for args, needle in (([bad, b], bad + " is not a chain file"), ([base + ".none.tsv", b], "cannot read"),
                         ([a, b, "--labels", "one"], "--labels takes two names"),
                         ([a, b, "--top", "-1"], "--top takes a count")):
        r = run(script, *args)
        if r.returncode == 0 or needle not in r.stderr:
            fail("%s: expected a failure naming %r, got exit %d, %s" % (args, needle, r.returncode, r.stderr))
    print("OK")


if __name__ == "__main__":
    main()
