#!/usr/bin/env python3
"""Sums an `ncu --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,...` log
by kernel name: launches, total time, share of the step, achieved DRAM GB/s, grids.
Usage: scripts/ncu_summary.py LOG [LOG...] (as written by scripts/gpu_suite.sh profile)."""
import collections
import csv
import re
import sys

for path in sys.argv[1:]:
    with open(path) as f:
        rows = [line for line in f if line.startswith('"')]
    reader = csv.reader(rows)
    header = next(reader)
    launches = {}
    for r in reader:
        d = dict(zip(header, r))
        k = launches.setdefault(d["ID"], {"name": d["Kernel Name"], "grid": d["Grid Size"]})
        k[d["Metric Name"]] = float(d["Metric Value"].replace(",", ""))
    by_kernel = collections.defaultdict(lambda: {"n": 0, "ns": 0.0, "bytes": 0.0, "grids": set()})
    for k in launches.values():
        name = re.sub(r"\(.*", "", k["name"]).replace("void ", "").replace("(anonymous namespace)::", "")
        name = name.replace("unnamed>::", "")
        a = by_kernel[name]
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
