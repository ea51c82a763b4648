#!/usr/bin/env python3
"""Where a graph replay's time goes, from a graph_trace file (tools/graph_trace).

  scripts/graph_trace_summary.py TRACE.tsv [--last N] [--top K] [--nodes FILE] [--frontier FILE]
                                 [--edges EDGES.tsv... [--chain FILE] [--caps FILE]]

Takes the graph with the most replays, its last N replays (those with its usual node
count), and for each kernel node:
  dur      its start to its end (with dependent launch, a kernel starts before its
           predecessor ends and waits inside: dur then includes that wait);
  advance  how far it moves the replay's finish frontier: nodes sorted by end, each
           gets end - (the previous node's end), the first end - the replay's start.
           The advances add up to the replay's span, so a node finishing under a longer
           one on another lane gets ~0 and a node on the critical chain gets the time it
           adds there. It is a proxy for the critical path: it charges a lane's kernel
           that ends just after a main-chain kernel with the gap between their ends.
  share    the replay's time sliced among the kernels resident at each instant (a kernel
           alone gets all of it, two together half each; sums to the span less the time
           no kernel is resident). A kernel waiting inside for its predecessor (dependent
           launch) is resident and takes its slice of that time too.
Medians over the replays, per node, then summed by kernel (name without its arguments).
Also: the median span, the time no kernel is resident (launch gaps); with --nodes every node
(median start, duration, advance, share, blocks, stream) in start order; with --frontier the
nodes in the order they end, each with its start, its end and its advance: the chain that
sets the replay's time, link by link, with the nodes that end under it at ~0. (Streams do not
name lanes: a capture's lanes take several streams over a step.)
With --edges (the graph's nodes and edges as DSV4_GRAPH_EDGES wrote them at its capture; of several
files, the one whose kernels are the traced graph's): the
critical chain, exact where the advance is a proxy. From the node that ends last, each step back
goes to the predecessor (by the graph's edges) that ends last; a link's time is its node's end less
that predecessor's end (the launch after it, any wait, and the node's own run past it). On the
replays' median times; summed by kernel, and with --chain FILE link by link, each with the kind of
edge into it (programmatic: launched under its predecessor; plain: after it). With --caps FILE (and
--edges), every kernel node's self time (its end less its last predecessor's end) and its cap: how
much shorter the replay would be if that node took no time and every other kept its self time (the
longest path through the graph without it). A first-order bound on what shortening one node can
give: where another path is nearly as long, the cap is small however long the node's own time. It
keeps the other nodes' self times as traced, so a node that waited for SMs the freed node held makes
the cap too small (the shared expert's SwiGLU beside the fused expert launch at 16 rows).
Trace nodes are matched to the edge file's by their index in the graph (the trace's node id less the
graph's high bits), checked by kernel name. Nodes that are not kernels (memset, memcpy, events) have
no times in a trace: each counts as ending when its last predecessor ends.
"""
import argparse
import collections
import re
import statistics
import sys


def short_name(name):
    s = name
    if s.startswith("void "):
        s = s[5:]
    depth = 0
    cut = len(s)
    for i, c in enumerate(s):  # cut the argument list: the last top-level '('
        if c in "<":
            depth += 1
        elif c in ">":
            depth -= 1
        elif c == "(" and depth == 0:
            cut = i
    s = s[:cut]
    s = re.sub(r"\(?\b(?:[A-Za-z_][A-Za-z_0-9]*::)+", lambda m: "(" if m.group(0).startswith("(") else "", s)
    s = re.sub(r"\(WFmt\)", "", s)
    return s


def base_name(name):
    s = short_name(name)
    return s.split("<", 1)[0]


def load(path):
    rows = []
    try:
        f = open(path)
    except OSError as e:
        sys.exit(f"{path}: cannot read the trace: {e.strerror}")
    with f:
        header = f.readline().rstrip("\n").split("\t")
        missing = {"graph", "correlation", "node", "stream", "start_ns", "end_ns", "blocks", "name"} - set(header)
        if missing:
            sys.exit(f"{path}: not a graph_trace file (no column {', '.join(sorted(missing))})")
        for line in f:
            parts = line.rstrip("\n").split("\t", len(header) - 1)
            if len(parts) != len(header):
                continue
            r = dict(zip(header, parts))
            rows.append((int(r["graph"]), int(r["correlation"]), int(r["node"]), int(r["start_ns"]),
                         int(r["end_ns"]), int(r["blocks"]), r["name"], int(r["stream"])))
    return rows


def idle_ns(intervals, t0, t1):
    idle, frontier = 0, t0
    for s, e in sorted(intervals):
        if s > frontier:
            idle += s - frontier
        frontier = max(frontier, e)
    return idle + max(0, t1 - frontier)


def shares(r):
    """Node -> ns of the replay's time sliced among the resident kernels."""
    events = sorted([(k[1], 1, k[0]) for k in r] + [(k[2], -1, k[0]) for k in r])
    out = collections.defaultdict(float)
    resident, last = set(), None
    for t, kind, n in events:
        if resident and last is not None and t > last:
            for m in resident:
                out[m] += (t - last) / len(resident)
        last = t
        if kind > 0:
            resident.add(n)
        else:
            resident.discard(n)
    return out


def write_nodes(path, per_node, order, columns):
    """One line a node, sorted by the median of `order`, with the medians of `columns` (us)."""
    with open(path, "w") as f:
        f.write("\t".join(c + "_us" for c in columns) + "\tblocks\tstream\tkernel\n")
        for _, d in sorted(per_node.items(), key=lambda kv: statistics.median(kv[1][order])):
            medians = "\t".join(f"{statistics.median(d[c]) / 1e3:.2f}" for c in columns)
            f.write(f"{medians}\t{d['blocks']}\t{d['stream']}\t{short_name(d['name'])}\n")


def load_edges(path):
    """(nodes: index -> (type, name), preds: index -> [(pred index, edge kind)]) of a DSV4_GRAPH_EDGES file."""
    nodes, preds = {}, collections.defaultdict(list)
    try:
        f = open(path)
    except OSError as e:
        sys.exit(f"{path}: cannot read the edges: {e.strerror}")
    with f:
        for ln, line in enumerate(f, 1):
            p = line.rstrip("\n").split("\t")
            if p[0] == "node" and len(p) == 4:
                nodes[int(p[1])] = (p[2], p[3])
            elif p[0] == "edge" and len(p) == 4:
                preds[int(p[2])].append((int(p[1]), p[3]))
            else:
                sys.exit(f"{path}:{ln}: not a DSV4_GRAPH_EDGES line: {line.strip()!r}")
    for n, ps in preds.items():
        for m, _ in ps + [(n, "")]:
            if m not in nodes:
                sys.exit(f"{path}: an edge names node {m}, which has no node line")
    return nodes, preds


def critical_chain(nodes, preds, end):
    """Links [(node, predecessor or None, edge kind, link ns, end ns)], a root first, to the last-ending node;
    end: node -> median end (ns from the replay's start) of every kernel node."""
    memo = {}

    def eff_end(n):  # a node without a time ends with its last predecessor
        if n in end:
            return end[n]
        if n not in memo:
            memo[n] = 0
            memo[n] = max((eff_end(m) for m, _ in preds.get(n, [])), default=0)
        return memo[n]

    n = max(end, key=end.get)
    chain, seen = [], set()
    while n not in seen:
        seen.add(n)
        ps = preds.get(n, [])
        if not ps:
            chain.append((n, None, "", eff_end(n), eff_end(n)))
            break
        m, kind = max(ps, key=lambda pk: eff_end(pk[0]))
        chain.append((n, m, kind, max(0, eff_end(n) - eff_end(m)), eff_end(n)))
        n = m
    return chain[::-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--last", type=int, default=50, help="replays to use, the last ones (default 50)")
    ap.add_argument("--top", type=int, default=30, help="kernels listed (default 30)")
    ap.add_argument("--nodes", help="write the median replay's nodes in start order to this file")
    ap.add_argument("--frontier", help="write the nodes in the order they end, with their advances, to this file")
    ap.add_argument("--edges", nargs="+", help="the graph's nodes and edges (DSV4_GRAPH_EDGES; several files: the "
                    "one of the traced graph is used): print its critical chain")
    ap.add_argument("--chain", help="with --edges: write the critical chain link by link to this file")
    ap.add_argument("--caps", help="with --edges: write every kernel node's self time and cap (what the span "
                    "loses if the node takes no time) to this file, largest cap first")
    a = ap.parse_args()
    for flag, value in (("--chain", a.chain), ("--caps", a.caps)):
        if value and not a.edges:
            sys.exit(f"{flag} needs --edges (the graph's edges, from DSV4_GRAPH_EDGES)")

    rows = load(a.trace)
    replays = collections.defaultdict(list)
    for g, c, n, s, e, b, name, stream in rows:
        if g != 0:
            replays[(g, c)].append((n, s, e, b, name, stream))
    if not replays:
        sys.exit(f"{a.trace}: no kernels from graph launches")
    by_graph = collections.defaultdict(list)
    for (g, c), ks in replays.items():
        by_graph[g].append(ks)
    graph = max(by_graph, key=lambda g: len(by_graph[g]))
    runs = by_graph[graph]
    usual = statistics.mode(len(r) for r in runs)
    runs = sorted((r for r in runs if len(r) == usual), key=lambda r: min(k[1] for k in r))[-a.last:]

    spans, idles = [], []
    per_node = collections.defaultdict(
        lambda: {"dur": [], "adv": [], "share": [], "start": [], "end": [], "name": "", "blocks": 0, "stream": 0})
    for r in runs:
        t0, t1 = min(k[1] for k in r), max(k[2] for k in r)
        spans.append(t1 - t0)
        idles.append(idle_ns([(k[1], k[2]) for k in r], t0, t1))
        frontier = t0
        sh = shares(r)
        for n, s, e, b, name, stream in sorted(r, key=lambda k: k[2]):
            d = per_node[n]
            d["share"].append(sh[n])
            d["dur"].append(e - s)
            d["adv"].append(e - frontier)
            d["start"].append(s - t0)
            d["end"].append(e - t0)
            d["name"], d["blocks"], d["stream"] = name, b, stream
            frontier = e

    span = statistics.median(spans)
    print(f"graph {graph}: {usual} kernel nodes, {len(runs)} replays used; span median {span / 1e3:.1f} us "
          f"(min {min(spans) / 1e3:.1f}, max {max(spans) / 1e3:.1f}); no kernel resident {statistics.median(idles) / 1e3:.1f} us")
    fam = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for n, d in per_node.items():
        f = fam[base_name(d["name"])]
        f[0] += 1
        f[1] += statistics.median(d["dur"])
        f[2] += statistics.median(d["adv"])
        f[3] += statistics.median(d["share"])
    print("\n| kernel | nodes | dur us (sum of medians) | advance us | advance % of span | share us |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, (cnt, dur, adv, sh) in sorted(fam.items(), key=lambda kv: -kv[1][2])[: a.top]:
        print(f"| {name} | {cnt} | {dur / 1e3:.1f} | {adv / 1e3:.1f} | {100 * adv / span:.1f} | {sh / 1e3:.1f} |")
    tot = [sum(v[i] for v in fam.values()) for i in range(4)]
    print(f"| (all) | {len(per_node)} | {tot[1] / 1e3:.1f} | {tot[2] / 1e3:.1f} | {100 * tot[2] / span:.1f} | "
          f"{tot[3] / 1e3:.1f} |")

    if a.edges:
        print_chain(a.edges, a.chain, a.caps, per_node, span)
    if a.nodes:
        write_nodes(a.nodes, per_node, "start", ["start", "dur", "adv", "share"])
    if a.frontier:
        write_nodes(a.frontier, per_node, "end", ["start", "end", "adv"])


def edges_mismatch(edges_path, nodes, per_node):
    """Why the edge file is not of the traced graph, or None where it is."""
    index = {n: n & 0xFFFFFFFF for n in per_node}  # the node's index in its graph
    for n, i in index.items():
        if i not in nodes or nodes[i][0] != "kernel":
            return (f"{edges_path}: the trace's node {i} ({base_name(per_node[n]['name'])}) is not a kernel node "
                    f"there")
        if base_name(nodes[i][1]) != base_name(per_node[n]["name"]):
            return f"{edges_path}: node {i} is {base_name(nodes[i][1])} there and {base_name(per_node[n]['name'])} in the trace"
    kernels = sum(1 for t, _ in nodes.values() if t == "kernel")
    if kernels != len(index):
        return f"{edges_path}: {kernels} kernel nodes there, {len(index)} in the trace"
    return None


def topological(nodes, preds):
    """The graph's node indices, each after its predecessors."""
    order, state = [], {}
    for root in sorted(nodes):
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                state[n] = 2
                order.append(n)
                continue
            if state.get(n):
                if state[n] == 1:
                    sys.exit(f"the graph's edges have a cycle through node {n}")
                continue
            state[n] = 1
            stack.append((n, True))
            stack.extend((m, False) for m, _ in preds.get(n, []) if state.get(m) != 2)
    return order


def node_caps(nodes, preds, end):
    """Kernel node -> (self ns, cap ns). Self: its end less its last predecessor's (a node without a time ends
    with its last predecessor, taking none). Cap: the span less the longest path with that node's self time 0."""
    order = topological(nodes, preds)
    eff, self_ns = {}, {}
    for n in order:
        before = max((eff[m] for m, _ in preds.get(n, [])), default=0)
        self_ns[n] = max(0, end[n] - before) if n in end else 0
        eff[n] = before + self_ns[n]
    span = max(eff.values(), default=0)

    def longest(without):
        t = {}
        for n in order:
            t[n] = max((t[m] for m, _ in preds.get(n, [])), default=0) + (0 if n == without else self_ns[n])
        return max(t.values(), default=0)

    return {n: (self_ns[n], span - longest(n)) for n in order if n in end}


def print_chain(edges_paths, chain_path, caps_path, per_node, span):
    # A process captures several graphs (one per batch bucket, the served step's): take the traced one's file.
    why = []
    for path in edges_paths:
        nodes, preds = load_edges(path)
        reason = edges_mismatch(path, nodes, per_node)
        if reason is None:
            break
        why.append(reason)
    else:
        sys.exit("none of the edge files is of the traced graph:\n  " + "\n  ".join(why))
    print(f"\nedges: {path}")
    index = {n: n & 0xFFFFFFFF for n in per_node}
    by_index = {i: n for n, i in index.items()}
    end = {i: statistics.median(per_node[n]["end"]) for n, i in index.items()}
    chain = critical_chain(nodes, preds, end)
    others = collections.Counter(t for t, _ in nodes.values() if t != "kernel")
    print(f"\ncritical chain: {len(chain)} links, {sum(c[3] for c in chain) / 1e3:.1f} us (span {span / 1e3:.1f}); "
          f"nodes that are not kernels: {dict(others) if others else 'none'}")
    fam = collections.defaultdict(lambda: [0, 0.0, 0])
    for i, _, kind, link, _ in chain:
        f = fam[base_name(nodes[i][1]) if nodes[i][0] == "kernel" else "(" + nodes[i][0] + ")"]
        f[0] += 1
        f[1] += link
        f[2] += kind == "plain"
    print("\n| kernel on the chain | links | us | % of span | of them after a plain edge |")
    print("|---|--:|--:|--:|--:|")
    for name, (cnt, t, plain) in sorted(fam.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {cnt} | {t / 1e3:.1f} | {100 * t / span:.1f} | {plain} |")
    if chain_path:
        with open(chain_path, "w") as f:
            f.write("start_us\tend_us\tlink_us\tedge_in\tkernel\n")
            for i, _, kind, link, e in chain:
                if i in by_index:
                    d = per_node[by_index[i]]
                    start, name = f"{statistics.median(d['start']) / 1e3:.2f}", short_name(d["name"])
                else:
                    start, name = "-", "(" + nodes[i][0] + ")"
                f.write(f"{start}\t{e / 1e3:.2f}\t{link / 1e3:.2f}\t{kind or 'root'}\t{name}\n")
    if caps_path:
        caps = node_caps(nodes, preds, end)
        on_chain = {c[0] for c in chain}
        ranked = sorted(caps.items(), key=lambda kv: (-kv[1][1], kv[0]))
        with open(caps_path, "w") as f:
            f.write("node\tend_us\tself_us\tcap_us\ton_chain\tkernel\n")
            for i, (own, cap) in ranked:
                f.write(f"{i}\t{end[i] / 1e3:.2f}\t{own / 1e3:.2f}\t{cap / 1e3:.2f}\t{int(i in on_chain)}\t"
                        f"{short_name(per_node[by_index[i]]['name'])}\n")
        print("\n| node | kernel | self us | cap us (the span's gain were it free) |")
        print("|--:|---|--:|--:|")
        for i, (own, cap) in ranked[:10]:
            print(f"| {i} | {base_name(per_node[by_index[i]]['name'])} | {own / 1e3:.1f} | {cap / 1e3:.1f} |")


if __name__ == "__main__":
    main()
