#!/usr/bin/env python3
"""Checks scripts/graph_trace_summary.py --edges on a made-up graph whose critical chain is known:
the chain, its links and edge kinds, a node that is not a kernel on a side path, every node's self
time and cap (--caps: B's 20 us of its own are worth only 10 to the span, the side path through D
being 10 shorter; D's are worth nothing), the refusal of edges from another graph, and the choice of
the traced graph's file among several.
usage: check_graph_trace_summary.py SUMMARY_SCRIPT TMP_DIR"""
import os
import subprocess
import sys

from check_common import fail, target_and_stem


def main():
    script, base = target_and_stem("graph_trace_check")
    # Graph 3 (node ids carry it in their high 32 bits), two replays 1 ms apart. Times in us:
    # A 0-10; B 5-30 (launched under A: programmatic); D 12-20 (after A: plain); a memset after D;
    # C 32-40 after B and the memset. The chain: A (10), B (30 - 10 = 20), C (40 - 30 = 10).
    kernels = [(0, "A", 0, 10), (1, "B", 5, 30), (2, "D", 12, 20), (3, "C", 32, 40)]
    with open(base + ".trace.tsv", "w") as f:
        f.write("graph\tcorrelation\tnode\tstream\tstart_ns\tend_ns\tblocks\tthreads\tname\n")
        for replay in range(2):
            t0 = 1_000_000 * (replay + 1)
            for i, name, s, e in kernels:
                f.write(f"3\t{10 + replay}\t{(3 << 32) + i}\t7\t{t0 + s * 1000}\t{t0 + e * 1000}\t1\t32\t"
                        f"void dsv4::ops::(anonymous namespace)::{name}_kernel<4>(float*, long)\n")

    def edges_file(path, name_of_b):
        with open(path, "w") as f:
            for i, name, _, _ in kernels:
                f.write(f"node\t{i}\tkernel\tdsv4::ops::(anonymous namespace)::"
                        f"{name_of_b if name == 'B' else name}_kernel<4>(float*, long)\n")
            f.write("node\t4\tmemset\t\n")
            f.write("edge\t0\t1\tprogrammatic\nedge\t0\t2\tplain\nedge\t1\t3\tplain\nedge\t2\t4\tplain\nedge\t4\t3\tplain\n")

    edges, chain, caps = base + ".edges.0.tsv", base + ".chain.tsv", base + ".caps.tsv"
    edges_file(edges, "B")
    run = subprocess.run([sys.executable, script, base + ".trace.tsv", "--last", "2", "--edges", edges, "--chain", chain,
                          "--caps", caps], capture_output=True, text=True, timeout=60)
    print(run.stdout)
    if run.returncode != 0:
        fail("exit %d: %s" % (run.returncode, run.stderr))
    if "critical chain: 3 links, 40.0 us (span 40.0)" not in run.stdout:
        fail("expected a chain of 3 links adding up to the 40 us span")
    if "nodes that are not kernels: {'memset': 1}" not in run.stdout:
        fail("the memset node is not reported")
    with open(chain) as f:
        lines = [l.rstrip("\n").split("\t") for l in f][1:]
    got = [(l[4].split("::")[-1].split("<")[0], l[2], l[3]) for l in lines]
    want = [("A_kernel", "10.00", "root"), ("B_kernel", "20.00", "programmatic"), ("C_kernel", "10.00", "plain")]
    if got != want:
        fail("chain %s, expected %s" % (got, want))
    # Self times A 10, B 20 (from A's end), D 10, C 10 (from B's end); caps: A, B, C 10 each (with B free, C
    # waits for the memset after D at 20), D 0. Largest cap first, then by node.
    with open(caps) as f:
        lines = [l.rstrip("\n").split("\t") for l in f]
    if lines[0] != ["node", "end_us", "self_us", "cap_us", "on_chain", "kernel"]:
        fail("caps header %s" % lines[0])
    got = [(l[0], l[2], l[3], l[4], l[5].split("::")[-1].split("<")[0]) for l in lines[1:]]
    want = [("0", "10.00", "10.00", "1", "A_kernel"), ("1", "20.00", "10.00", "1", "B_kernel"),
            ("3", "10.00", "10.00", "1", "C_kernel"), ("2", "10.00", "0.00", "0", "D_kernel")]
    if got != want:
        fail("caps %s, expected %s" % (got, want))
    if "| 1 | (anonymous namespace)::B_kernel | 20.0 | 10.0 |" not in run.stdout:
        fail("the caps table does not list B's 20 us of its own and 10 of cap")
    # Edges of another graph (a kernel named differently) are refused, with the node named.
    edges_file(edges, "E")
    run = subprocess.run([sys.executable, script, base + ".trace.tsv", "--last", "2", "--edges", edges],
                         capture_output=True, text=True, timeout=60)
    if run.returncode == 0 or "node 1 is (anonymous namespace)::E_kernel there" not in run.stderr:
        fail("edges of another graph accepted or not named: rc %d, %s" % (run.returncode, run.stderr))
    # Of several files (a process's captures), the traced graph's is used, wherever it comes.
    right = base + ".edges.1.tsv"
    edges_file(right, "B")
    run = subprocess.run([sys.executable, script, base + ".trace.tsv", "--last", "2", "--edges", edges, right],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0 or f"edges: {right}" not in run.stdout or "critical chain: 3 links" not in run.stdout:
        fail("the traced graph's file not chosen among two: rc %d, %s%s" % (run.returncode, run.stdout, run.stderr))
    # --caps without --edges is refused.
    run = subprocess.run([sys.executable, script, base + ".trace.tsv", "--caps", caps], capture_output=True, text=True,
                         timeout=60)
    if run.returncode == 0 or "--caps needs --edges" not in run.stderr:
        fail("--caps without --edges accepted: rc %d, %s" % (run.returncode, run.stderr))
    for p in (base + ".trace.tsv", edges, right, chain, caps):
        os.remove(p)
    print("PASS")


if __name__ == "__main__":
    main()
