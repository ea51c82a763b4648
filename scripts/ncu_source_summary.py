#!/usr/bin/env python3
"""Summarises an Nsight Compute source page exported as CSV
(`ncu -i REPORT --page source --csv --print-source sass`, plain or gzipped; the
`ncu-kernel` step of scripts/gpu_suite.sh writes one per batch) kernel by kernel:

- warp instructions executed, and their count per execution of the most executed
  instruction (in a kernel whose time is one loop, that is the instructions a warp
  spends on one iteration, e.g. one stage of a GEMM);
- the instruction mix by opcode with its modifiers (IMAD.SHL.U32 and IMAD count
  apart; the predicate dropped), per iteration as above;
- the warp stall samples by reason, and the instructions with the most samples;
- with --listing P, the instructions executed at least P% as often as the most
  executed one, in address order, each with its count per iteration and its stall
  samples: the loop's SASS, to attribute the mix to source (the eighteenth session
  read the FP4 stage's scale conversion and decode this way);
- with --regions P, the SASS cut at its synchronization points (barriers, memory
  barriers, wgmma waits, exits) into address-ordered regions, each holding at least
  P% of the stall samples printed with its share, its instructions per iteration,
  its top stall reasons and the instruction that ends it: where a kernel of phases
  spends its time (the nineteenth session found the wgmma attention's warpgroups
  waiting on one another this way). A barrier's waiting is sampled on the
  instruction after it, so it counts in the region that follows the barrier.

How the seventeenth session read the FP4 expert GEMM (docs/BENCHMARKS.md).
Usage: scripts/ncu_source_summary.py [--top N] [--ops N] [--listing P] [--regions P] FILE [FILE...]"""
import collections
import csv
import gzip
import io
import re
import signal
import sys


def read_kernels(path):
    """[(kernel name, header, rows)] from one export (one block per kernel)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        text = f.read()
    kernels = []
    current = None
    for line in text.splitlines():
        if line.startswith('"Kernel Name"'):
            name = next(csv.reader([line]))[1]
            current = {"name": name, "lines": []}
            kernels.append(current)
        elif current is not None and line.strip():
            current["lines"].append(line)
    out = []
    for k in kernels:
        rows = list(csv.reader(io.StringIO("\n".join(k["lines"]))))
        if not rows or "Source" not in rows[0]:
            continue
        out.append((k["name"], rows[0], rows[1:]))
    if not out:
        sys.exit(f"{path}: no source-page blocks (export with --page source --csv --print-source sass)")
    return out


def number(s):
    try:
        return int(s.replace(",", ""))
    except ValueError:
        return 0


def opcode(sass):
    s = re.sub(r"^@!?U?P[T0-9]+\s+", "", sass.strip())
    return s.split(" ")[0] if s else "?"


def short_name(name):
    name = re.sub(r"\((?:\w+::)*\w+\)", "", name)  # the casts in template arguments: (WFmt)1, (bool)0
    name = re.sub(r"\(.*", "", name).replace("void ", "")  # the parameter list
    return re.sub(r"\w+::", "", name)


SYNC_POINT = re.compile(r"^(BAR\.(SYNC|RED|ARV)|BAR\s|MEMBAR|WARPGROUP\.DEPBAR|EXIT|SYNCS\.)")


def print_regions(rows, col, executed, hottest, stalls, samples, min_share):
    """Regions of the SASS between synchronization points, in address order."""
    src, ns = col["Source"], col["# Samples"]
    address = col.get("Address")
    print(f"  regions between synchronization points holding >= {min_share:g}% of the stall samples:")
    print(f"  {'from':>8s} {'to':>8s} {'samples':>7s} {'share':>6s} {'per iter':>8s}  top reasons; ends with")
    start, n_samples, n_instr = 0, 0, 0.0
    reasons = collections.Counter()
    where = (lambda k: rows[k][address][-6:]) if address is not None else str
    for i, (r, n) in enumerate(zip(rows, executed)):
        n_samples += number(r[ns])
        n_instr += n / hottest
        for h in stalls:
            reasons[h[6:]] += number(r[col[h]])
        if SYNC_POINT.match(re.sub(r"^@!?U?P[T0-9]+\s+", "", r[src].strip())) or i == len(rows) - 1:
            if samples and 100 * n_samples >= min_share * samples:
                top3 = ", ".join(f"{h} {100 * v / n_samples:.0f}%" for h, v in reasons.most_common(3) if v)
                print(f"  {where(start):>8s} {where(i):>8s} {n_samples:7d} {100 * n_samples / samples:5.1f}%"
                      f" {n_instr:8.1f}  {top3}; {r[src].strip()[:48]}")
            start, n_samples, n_instr = i + 1, 0, 0.0
            reasons = collections.Counter()


def summarize(path, name, header, rows, top, ops, listing, regions=None):
    col = {h: i for i, h in enumerate(header)}
    for need in ("Source", "Instructions Executed", "# Samples"):
        if need not in col:
            sys.exit(f"{path}: column {need!r} missing from the source page")
    src, ie, ns = col["Source"], col["Instructions Executed"], col["# Samples"]
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    executed = [number(r[ie]) for r in rows]
    total = sum(executed)
    hottest = max(executed) if executed else 0
    samples = sum(number(r[ns]) for r in rows)
    print(f"{path}: {short_name(name)}")
    print(f"  warp instructions {total:,}; most executed instruction {hottest:,} times;"
          f" {total / hottest if hottest else 0:.0f} instructions per execution of it; {samples:,} stall samples")
    mix = collections.Counter()
    for r, n in zip(rows, executed):
        mix[opcode(r[src])] += n
    print(f"  {'opcode':32s} {'share':>6s} {'per iteration':>13s}")
    for op, n in mix.most_common(ops):
        print(f"  {op:32s} {100 * n / total:5.1f}% {n / hottest if hottest else 0:13.1f}")
    by_reason = collections.Counter()
    for r in rows:
        for h in stalls:
            by_reason[h] += number(r[col[h]])
    print("  stall samples by reason: " +
          ", ".join(f"{h[6:]} {100 * v / samples:.1f}%" for h, v in by_reason.most_common(8) if samples))
    print(f"  {'samples':>7s}  instruction (top reasons)")
    for r in sorted(rows, key=lambda r: -number(r[ns]))[:top]:
        reasons = sorted(((number(r[col[h]]), h[6:]) for h in stalls), reverse=True)[:3]
        print(f"  {number(r[ns]):7d}  {r[src].strip()[:64]:64s} " +
              " ".join(f"{h}:{v}" for v, h in reasons if v))
    if regions is not None and hottest:
        print_regions(rows, col, executed, hottest, stalls, samples, regions)
    if listing is not None and hottest:
        address = col.get("Address")
        print(f"  instructions executed >= {listing:g}% as often as the most executed one, in address order:")
        print(f"  {'address':>8s} {'per iter':>8s} {'samples':>7s}  instruction")
        for r, n in zip(rows, executed):
            if 100 * n >= listing * hottest:
                where = r[address][-6:] if address is not None else ""
                print(f"  {where:>8s} {n / hottest:8.3f} {number(r[ns]):7d}  {r[src].strip()}")


def main(argv):
    top, ops, listing, regions = 15, 20, None, None
    usage = "usage: scripts/ncu_source_summary.py [--top N] [--ops N] [--listing P] [--regions P] FILE [FILE...]"
    while argv[:1] in (["--top"], ["--ops"], ["--listing"], ["--regions"]):
        if len(argv) < 2:
            sys.exit(usage)
        if argv[0] in ("--listing", "--regions"):
            try:
                share = float(argv[1])
            except ValueError:
                share = -1.0
            if not 0 <= share <= 100:
                sys.exit(f"{argv[0]} takes a percentage (0-100), not {argv[1]!r}; {usage}")
            if argv[0] == "--listing":
                listing = share
            else:
                regions = share
        elif not argv[1].isdigit():
            sys.exit(usage)
        elif argv[0] == "--top":
            top = int(argv[1])
        else:
            ops = int(argv[1])
        argv = argv[2:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    for path in argv:
        seen = set()
        for name, header, rows in read_kernels(path):
            key = (name, len(rows), sum(number(r[header.index("# Samples")]) for r in rows))
            if key in seen:  # (an export may repeat a kernel's block)
                continue
            seen.add(key)
            summarize(path, name, header, rows, top, ops, listing, regions)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    sys.exit(main(sys.argv[1:]))
