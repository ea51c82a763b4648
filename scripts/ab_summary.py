#!/usr/bin/env python3
"""Summary of an ab_bench.sh run: per variant and batch, the mean step over the rounds,
its change against `base` (the tree) and its ratio to the roofline measured in the
same runs, and whether every round of the variant lies on the same side of every
round of base (a change the rounds' spread cannot explain). Also the GB a step moved
and the change of the step per GB: where a variant changes any bit the routing (and
so the expert bytes, a few % at batch 16-64 on random weights) changes with it, and
the raw step compares different work.

    scripts/ab_summary.py OUT   (reads OUT/NAME-ROUND.json, as ab_bench.sh writes them)

Runs of `bench sampling` (ab_bench.sh with BENCH=sampling) are summarized per row count and
sampler instead: the mean backend ms a call (the choices up, the launch, the ids down; also the
greedy argmax and the 5 log-probabilities), its change against base, and whether the rounds are apart.
"""
import glob
import json
import os
import re
import sys
from collections import defaultdict


def sampling_times(d):
    """{(rows, what): backend ms} of one bench sampling JSON."""
    out = {}
    for r in d["results"]:
        out[(r["rows"], "argmax")] = r["backend_argmax_ms"]
        for s in r["samplers"]:
            out[(r["rows"], s["sampler"])] = s["backend_ms"]
        if "logprobs_top5" in r:
            out[(r["rows"], "logprobs top 5")] = r["logprobs_top5"]["backend_ms"]
    return out


def summarize_sampling(runs):
    """runs: name -> [one round's sampling_times]."""
    keys = list(runs["base"][0])
    print("variant          rows  what                mean ms   vs base   rounds apart")
    for name in ["base"] + sorted(n for n in runs if n != "base"):
        for key in keys:
            s, base = [t[key] for t in runs[name] if key in t], [t[key] for t in runs["base"]]
            if not s:
                continue
            mean, base_mean = sum(s) / len(s), sum(base) / len(base)
            change = apart = ""
            if name != "base":
                change = "%+.1f%%" % (100.0 * (mean / base_mean - 1.0))
                apart = "yes" if max(s) < min(base) or min(s) > max(base) else "no"
            print("%-14s %6d  %-17s %9.3f %9s   %s" % (name, key[0], key[1], mean, change, apart))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = defaultdict(list)  # name -> [results of one round]
    setting = {}  # name -> (device, DSV4_* switches) of its first round (older JSON: neither)
    devices = set()  # every run's device: an A/B compares runs of one machine
    for path in sorted(glob.glob(os.path.join(sys.argv[1], "*-*.json"))):
        m = re.fullmatch(r"(.+)-(\d+)\.json", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            d = json.load(f)
        if "copy_bandwidth_gb_s" in d:  # bench decode
            for r in d["results"]:
                r["_gb"] = r["roofline_ms"] * d["copy_bandwidth_gb_s"] / 1000.0
            runs[m.group(1)].append(d["results"])
        else:  # bench sampling
            runs[m.group(1)].append(sampling_times(d))
        setting.setdefault(m.group(1), (d.get("device", {}).get("name"), d.get("environment")))
        devices.add(d.get("device", {}).get("name"))
    if "base" not in runs:
        sys.exit(f"ab_summary: no base-N.json in {sys.argv[1]}")
    sampling = {isinstance(rounds[0], dict) for rounds in runs.values()}
    if len(sampling) > 1:
        sys.exit(f"ab_summary: {sys.argv[1]} holds runs of both bench decode and bench sampling")
    if len(devices - {None}) > 1:
        print("WARNING: the runs were on different devices (%s): their steps do not compare" %
              ", ".join(sorted(str(x) for x in devices - {None})))
    for name in ["base"] + sorted(n for n in runs if n != "base"):
        device, env = setting[name]
        if device or env:
            switches = " ".join("%s=%s" % kv for kv in sorted((env or {}).items()))
            print("%-14s on %s%s" % (name, device or "?", ": " + switches if switches else ""))
    if sampling == {True}:
        summarize_sampling(runs)
        return
    batches = [r["batch_per_rank"] for r in runs["base"][0]]

    def steps(name, i):
        return [rnd[i]["roofline_ms"] * rnd[i]["ratio_to_roofline"] for rnd in runs[name]]

    def roof(name, i):
        return sum(rnd[i]["ratio_to_roofline"] for rnd in runs[name]) / len(runs[name])

    def gb(name, i):
        return sum(rnd[i]["_gb"] for rnd in runs[name]) / len(runs[name])

    print("variant         batch   mean ms   vs base   x roof   rounds apart      GB   per GB vs base")
    for name in ["base"] + sorted(n for n in runs if n != "base"):
        for i, b in enumerate(batches):
            s, base = steps(name, i), steps("base", i)
            mean, base_mean = sum(s) / len(s), sum(base) / len(base)
            if name == "base":
                change, apart, per_gb = "", "", ""
            else:
                change = "%+.1f%%" % (100.0 * (mean / base_mean - 1.0))
                apart = "yes" if max(s) < min(base) or min(s) > max(base) else "no"
                per_gb = "%+.1f%%" % (100.0 * ((mean / gb(name, i)) / (base_mean / gb("base", i)) - 1.0))
            print("%-14s %6d %9.3f %9s %8.2f   %-12s %7.2f   %s" % (name, b, mean, change, roof(name, i), apart,
                                                                gb(name, i), per_gb))


if __name__ == "__main__":
    main()
