#!/usr/bin/env python3
"""Sums an `ncu --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,...` log
by kernel name: launches, total time, share of the step, achieved DRAM GB/s, grids.
With --launches REGEX, lists instead every launch whose kernel name matches: its
ID, grid, time, DRAM bytes read and written, and GB/s (how the thirteenth session
compared the expert GEMM's gate/up and down launches of each layer).
Usage: scripts/ncu_summary.py [--launches REGEX] LOG [LOG...] (as written by
scripts/gpu_suite.sh profile)."""
import collections
import csv
import re
import signal
import sys


def read_launches(path):
    with open(path) as f:
        rows = [line for line in f if line.startswith('"')]
    if not rows:
        sys.exit(f"{path}: no ncu CSV rows (was it written with --csv?)")
    reader = csv.reader(rows)
    header = next(reader)
    launches = {}
    for r in reader:
        d = dict(zip(header, r))
        k = launches.setdefault(d["ID"], {"name": d["Kernel Name"], "grid": d["Grid Size"]})
        k[d["Metric Name"]] = float(d["Metric Value"].replace(",", ""))
    return launches


def short_name(name):
    name = re.sub(r"\(.*", "", name).replace("void ", "").replace("(anonymous namespace)::", "")
    return name.replace("unnamed>::", "")


def summarize(path, launches):
    by_kernel = collections.defaultdict(lambda: {"n": 0, "ns": 0.0, "bytes": 0.0, "grids": set()})
    for k in launches.values():
        a = by_kernel[short_name(k["name"])]
        a["n"] += 1
        a["ns"] += k.get("gpu__time_duration.sum", 0.0)
        a["bytes"] += k.get("dram__bytes_read.sum", 0.0) + k.get("dram__bytes_write.sum", 0.0)
        a["grids"].add(k["grid"])
    total = sum(a["ns"] for a in by_kernel.values())
    print(f"{path}: {len(launches)} launches, {total / 1e3:.0f} us of kernel time")
    print(f"{'kernel':55s} {'n':>4s} {'us':>9s} {'share':>6s} {'GB/s':>6s}  grids")
    for name, a in sorted(by_kernel.items(), key=lambda x: -x[1]["ns"]):
        gbs = a["bytes"] / a["ns"] if a["ns"] else 0.0
        print(f"{name[:55]:55s} {a['n']:4d} {a['ns'] / 1e3:9.1f} {100 * a['ns'] / total:5.1f}% {gbs:6.0f}  "
              f"{','.join(sorted(a['grids']))[:60]}")


def list_launches(path, launches, pattern):
    print(f"{path}: launches of kernels matching {pattern!r}")
    print(f"{'id':>5s} {'kernel':55s} {'grid':>16s} {'us':>9s} {'MB read':>9s} {'MB written':>10s} {'GB/s':>6s}")
    for lid, k in sorted(launches.items(), key=lambda x: int(x[0])):
        name = short_name(k["name"])
        if not re.search(pattern, name):
            continue
        ns = k.get("gpu__time_duration.sum", 0.0)
        rd, wr = k.get("dram__bytes_read.sum", 0.0), k.get("dram__bytes_write.sum", 0.0)
        gbs = (rd + wr) / ns if ns else 0.0
        print(f"{lid:>5s} {name[:55]:55s} {k['grid']:>16s} {ns / 1e3:9.1f} {rd / 1e6:9.1f} {wr / 1e6:10.1f} {gbs:6.0f}")


def main(argv):
    pattern = None
    if argv[:1] == ["--launches"]:
        if len(argv) < 3:
            sys.exit("usage: scripts/ncu_summary.py [--launches REGEX] LOG [LOG...]")
        pattern, argv = argv[1], argv[2:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    for path in argv:
        launches = read_launches(path)
        if pattern is None:
            summarize(path, launches)
        else:
            list_launches(path, launches, pattern)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    sys.exit(main(sys.argv[1:]))
