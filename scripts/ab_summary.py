#!/usr/bin/env python3
"""Summary of an ab_bench.sh run: per variant and batch, the mean step over the rounds,
its change against `base` (the tree) and its ratio to the roofline measured in the
same runs, and whether every round of the variant lies on the same side of every
round of base (a change the rounds' spread cannot explain).

    scripts/ab_summary.py OUT   (reads OUT/NAME-ROUND.json, as ab_bench.sh writes them)
"""
import glob
import json
import os
import re
import sys
from collections import defaultdict


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = defaultdict(list)  # name -> [results of one round]
    for path in sorted(glob.glob(os.path.join(sys.argv[1], "*-*.json"))):
        m = re.fullmatch(r"(.+)-(\d+)\.json", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            runs[m.group(1)].append(json.load(f)["results"])
    if "base" not in runs:
        sys.exit(f"ab_summary: no base-N.json in {sys.argv[1]}")
    batches = [r["batch_per_rank"] for r in runs["base"][0]]

    def steps(name, i):
        return [rnd[i]["roofline_ms"] * rnd[i]["ratio_to_roofline"] for rnd in runs[name]]

    def roof(name, i):
        return sum(rnd[i]["ratio_to_roofline"] for rnd in runs[name]) / len(runs[name])

    print("variant         batch   mean ms   vs base   x roof   rounds apart")
    for name in ["base"] + sorted(n for n in runs if n != "base"):
        for i, b in enumerate(batches):
            s, base = steps(name, i), steps("base", i)
            mean, base_mean = sum(s) / len(s), sum(base) / len(base)
            if name == "base":
                change, apart = "", ""
            else:
                change = "%+.1f%%" % (100.0 * (mean / base_mean - 1.0))
                apart = "yes" if max(s) < min(base) or min(s) > max(base) else "no"
            print("%-14s %6d %9.3f %9s %8.2f   %s" % (name, b, mean, change, roof(name, i), apart))


if __name__ == "__main__":
    main()
