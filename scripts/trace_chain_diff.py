#!/usr/bin/env python3
"""Two critical chains side by side, from graph_trace_summary.py --chain files (an A/B's two traces).

  scripts/trace_chain_diff.py BASE.tsv OTHER.tsv [--top N] [--labels BASE,OTHER] [--bare]

Prints each chain's span (its last link's end) and links, then by kernel (its name with template
arguments, without its parameter list) the links and microseconds on each chain and their change,
largest change first. Then it aligns the two chains by kernel name (difflib: a switch may add,
drop or replace kernels) and lists the N aligned links that changed most, with their positions on
each chain, and the links found on one chain only. A link is the time a kernel adds to the chain:
its end less the previous link's end, so a link that shrinks may only have moved time onto the
next one. Sums over a stretch (say a layer's links) say more than one link does. --bare compares
kernels by name alone, for chains from builds whose template arguments differ."""
import argparse
import collections
import csv
import difflib
import sys

COLUMNS = ("start_us", "end_us", "link_us", "edge_in", "kernel")


def kernel_name(full):
    """The kernel's name and template arguments: namespaces and its parameter list dropped."""
    name = full.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    head, sep, args = name.partition("<")
    return head.rsplit("::", 1)[-1] + sep + args


def read_chain(path, bare):
    """[(kernel, link_us, end_us)] in chain order; exits naming the file on a bad one."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except OSError as e:
        sys.exit("trace_chain_diff: cannot read %s: %s" % (path, e.strerror))
    if not rows or tuple(rows[0][:len(COLUMNS)]) != COLUMNS:
        sys.exit("trace_chain_diff: %s is not a chain file (expected the columns %s; "
                 "graph_trace_summary.py --chain writes them)" % (path, ", ".join(COLUMNS)))
    links = []
    for n, row in enumerate(rows[1:], start=2):
        try:
            name = kernel_name(row[4])
            links.append((name.split("<")[0] if bare else name, float(row[2]), float(row[1])))
        except (IndexError, ValueError):
            sys.exit("trace_chain_diff: %s line %d: expected %d tab-separated columns with numbers in "
                     "end_us and link_us" % (path, n, len(COLUMNS)))
    if not links:
        sys.exit("trace_chain_diff: %s holds no links" % path)
    return links


def by_kernel(links):
    totals = collections.OrderedDict()
    for name, us, _ in links:
        count, total = totals.get(name, (0, 0.0))
        totals[name] = (count + 1, total + us)
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the first chain (graph_trace_summary.py --chain)")
    parser.add_argument("other", help="the second chain")
    parser.add_argument("--top", type=int, default=15, help="aligned links listed, largest change first (15)")
    parser.add_argument("--labels", default="base,other", help="the two chains' names in the tables")
    parser.add_argument("--bare", action="store_true", help="kernels by name, without template arguments")
    args = parser.parse_args()
    labels = args.labels.split(",")
    if len(labels) != 2 or not all(labels):
        sys.exit("trace_chain_diff: --labels takes two names separated by a comma, not '%s'" % args.labels)
    if args.top < 0:
        sys.exit("trace_chain_diff: --top takes a count >= 0, not %d" % args.top)
    a, b = read_chain(args.base, args.bare), read_chain(args.other, args.bare)
    span_a, span_b = a[-1][2], b[-1][2]
    print("span: %s %.1f us (%d links), %s %.1f us (%d links): %+.1f us (%+.1f%%)" %
          (labels[0], span_a, len(a), labels[1], span_b, len(b), span_b - span_a, 100.0 * (span_b / span_a - 1.0)))

    ka, kb = by_kernel(a), by_kernel(b)
    names = list(ka) + [n for n in kb if n not in ka]
    rows = []
    for n in names:
        ca, ua = ka.get(n, (0, 0.0))
        cb, ub = kb.get(n, (0, 0.0))
        rows.append((n, ca, ua, cb, ub, ub - ua))
    rows.sort(key=lambda r: -abs(r[5]))
    print("\nby kernel, largest change first:\n")
    print("| kernel | %s links | %s us | %s links | %s us | change us |" % (labels[0], labels[0], labels[1], labels[1]))
    print("|---|--:|--:|--:|--:|--:|")
    for n, ca, ua, cb, ub, d in rows:
        print("| %s | %d | %.1f | %d | %.1f | %+.1f |" % (n, ca, ua, cb, ub, d))

    matcher = difflib.SequenceMatcher(None, [l[0] for l in a], [l[0] for l in b], autojunk=False)
    aligned, only = [], []
    for tag, i0, i1, j0, j1 in matcher.get_opcodes():
        if tag == "equal":
            aligned += [(i, j) for i, j in zip(range(i0, i1), range(j0, j1))]
        else:
            only += [(labels[0], i, a[i]) for i in range(i0, i1)] + [(labels[1], j, b[j]) for j in range(j0, j1)]
    aligned.sort(key=lambda ij: -abs(b[ij[1]][1] - a[ij[0]][1]))
    print("\n%d links aligned by kernel; the %d that changed most (positions from 0):\n" %
          (len(aligned), min(args.top, len(aligned))))
    print("| %s # | %s # | kernel | %s us | %s us | change us |" % (labels[0], labels[1], labels[0], labels[1]))
    print("|--:|--:|---|--:|--:|--:|")
    for i, j in aligned[:args.top]:
        print("| %d | %d | %s | %.2f | %.2f | %+.2f |" % (i, j, a[i][0], a[i][1], b[j][1], b[j][1] - a[i][1]))
    if only:
        print("\nlinks on one chain only:\n")
        print("| chain | # | kernel | us |")
        print("|---|--:|---|--:|")
        for label, k, link in only:
            print("| %s | %d | %s | %.2f |" % (label, k, link[0], link[1]))


if __name__ == "__main__":
    main()
