#!/usr/bin/env python3
"""Summarise the per-CTA stamps of `dsv4 bench decode --cta-probe FILE` (ops/cuda/cta_probe.h).

A launch is one (site, tag) in one replay: tags are a pointer argument unique to a launch
(its weights), so the 8 layers' launches of one kernel stay apart. For each launch, over its
CTAs: when the first entered (from the replay's first stamp), its span (first entry to last
exit), the span from its first `waited` stamp (in the graphs CTAs enter while the predecessor
still runs: from there on the launch is on its own), the ramp (first to last entry), the drain
(last entry to last exit), each mark's median and maximum offset from the CTA's own entry, and
the chain of the CTA that exited last. Launches
are then grouped by site and CTA count (which tells a kernel's launches of different shapes
apart, e.g. the linears of a layer), medians over every launch of every replay; --launches N
lists a replay's first N launches one by one, each also with the time from the latest exit of the
launches before it to its first entry, and the other launches' CTAs that ran on its last CTA's SM
while that CTA ran.

Usage: cta_probe_summary.py FILE [--batch B] [--launches N] [--csv OUT]
"""
import argparse
import collections
import csv
import gzip
import statistics
import sys


def open_text(path):
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def median(v):
    return statistics.median(v) if v else float("nan")


def pct(v, q):
    if not v:
        return float("nan")
    s = sorted(v)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def load(path, batch):
    # replays[(batch, replay)][(site, tag, instance)][cta] = {mark_no: (ns, sm, clock, site)}. A CTA's
    # stamps come entry first; its k-th entry under one (site, tag) is instance k (launches of one
    # tag do not overlap), so equal tags of different launches stay apart.
    replays = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(dict)))
    names = {}
    entries = collections.Counter()  # (batch, replay, site, tag, cta) -> entries seen
    with open_text(path) as f:
        r = csv.DictReader(f, delimiter="\t")
        need = {"batch", "replay", "site", "mark", "mark_no", "tag", "cta", "sm", "ns", "clock"}
        if not r.fieldnames or not need <= set(r.fieldnames):
            sys.exit(f"{path}: not a --cta-probe file (columns {sorted(need)} expected, got {r.fieldnames})")
        for row in r:
            b = int(row["batch"])
            if batch is not None and b != batch:
                continue
            m = int(row["mark_no"])
            cta_key = (b, int(row["replay"]), row["site"], row["tag"], int(row["cta"]))
            if m == 0:
                entries[cta_key] += 1
            key = (row["site"], row["tag"], max(0, entries[cta_key] - 1))
            names[(row["site"], m)] = row["mark"]
            replays[(b, int(row["replay"]))][key][int(row["cta"])][m] = (
                int(row["ns"]), int(row["sm"]), int(row["clock"]), row["site"])
    return replays, names


def sm_clock_mhz(replay):
    """The SMs' clock from clock64 against globaltimer, stamps of one SM (median over SMs)."""
    by_sm = collections.defaultdict(list)
    for ctas in replay.values():
        for marks in ctas.values():
            for ns, sm, clk, _ in marks.values():
                by_sm[sm].append((ns, clk))
    rates = []
    for pts in by_sm.values():
        if len(pts) < 2:
            continue
        pts.sort()
        (n0, c0), (n1, c1) = pts[0], pts[-1]
        if n1 - n0 > 100_000:  # 100 µs apart at least
            rates.append((c1 - c0) / (n1 - n0) * 1e3)
    return median(rates)


def timer_step_ns(replay):
    """The smallest non-zero difference between globaltimer stamps (its granularity, at most)."""
    v = sorted({ns for ctas in replay.values() for marks in ctas.values() for ns, _, _, _ in marks.values()})
    d = [b - a for a, b in zip(v, v[1:]) if b > a]
    return min(d) if d else float("nan")


WAITED = set()  # (site, mark) of the marks that come right after a kernel's dependency wait (filled by main)


def launch_stats(ctas, exit_mark=255):
    entries = [m[0][0] for m in ctas.values() if 0 in m]
    exits = [m[exit_mark][0] for m in ctas.values() if exit_mark in m]
    if not entries:
        return None
    first, last_entry = min(entries), max(entries)
    s = {"ctas": len(ctas), "start": first, "ramp": last_entry - first}
    s["span"] = (max(exits) - first) if exits else float("nan")
    s["drain"] = (max(exits) - last_entry) if exits else float("nan")
    waited = [m[k][0] for m in ctas.values() for k in m if (m[k][3], k) in WAITED]
    s["from_wait"] = (max(exits) - min(waited)) if exits and waited else float("nan")
    marks = sorted({k for m in ctas.values() for k in m if k != 0})
    s["marks"] = {}
    for k in marks:
        d = [m[k][0] - m[0][0] for m in ctas.values() if k in m and 0 in m]
        s["marks"][k] = (median(d), max(d) if d else float("nan"), len(d))
    if exits:
        cta = max((m[exit_mark][0], c) for c, m in ctas.items() if exit_mark in m)[1]
        chain = ctas[cta]
        s["last_chain"] = {k: chain[k][0] - first for k in sorted(chain, key=lambda k: (chain[k][0], k))}
        s["last_sm"] = next(iter(chain.values()))[1]
        if 0 in chain:
            s["last_cta"] = (s["last_sm"], chain[0][0], chain[exit_mark][0])
    return s


def beside_last_cta(launches, stats):
    """For each launch (key -> its stats), the CTAs of other launches that ran on its last CTA's SM while
    that CTA ran (entry to exit), counted by site: "gemm_tile 2, attention 1", or "" (none, or no exit)."""
    by_sm = collections.defaultdict(list)  # sm -> [(entry, exit, launch key, site)]
    for key, ctas in launches.items():
        for m in ctas.values():
            if 0 in m and 255 in m:
                by_sm[m[0][1]].append((m[0][0], m[255][0], key, m[0][3]))
    out = {}
    for key, st in stats.items():
        if "last_cta" not in st:
            out[key] = ""
            continue
        sm, t0, t1 = st["last_cta"]
        n = collections.Counter(site for e, x, k, site in by_sm[sm] if k != key and e < t1 and x > t0)
        out[key] = ", ".join(f"{site} {c}" for site, c in sorted(n.items()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--batch", type=int, help="only this batch size (default: every batch in the file)")
    ap.add_argument("--launches", type=int, default=0,
                    help="also list the first N launches of a replay one by one (default 0: by site only)")
    ap.add_argument("--csv", help="write every launch's numbers (all replays) to this CSV")
    a = ap.parse_args()
    replays, names = load(a.file, a.batch)
    # (the marks that come right after a kernel's dependency wait)
    WAITED.update(key for key, name in names.items() if name in ("waited", "tile_known", "item_taken"))
    if not replays:
        sys.exit(f"{a.file}: no stamps" + (f" for batch {a.batch}" if a.batch is not None else ""))

    def mark_name(site, k):
        return "exit" if k == 255 else names.get((site, k), f"m{k}")

    rows = []  # (batch, replay, site, k-th, tag, stats)
    for (b, rep), launches in sorted(replays.items()):
        order = sorted(launches.items(), key=lambda kv: min(m[0][0] for m in kv[1].values() if 0 in m)
                       if any(0 in m for m in kv[1].values()) else 0)
        kth = collections.Counter()
        frontier = None  # the latest last exit of the replay's launches so far (by first entry)
        stats = {key: launch_stats(ctas) for key, ctas in order}
        stats = {key: st for key, st in stats.items() if st is not None}
        beside = beside_last_cta(launches, stats)
        for key, ctas in order:
            site, tag, _ = key
            st = stats.get(key)
            if st is None:
                continue
            st["beside"] = beside[key]
            # From that frontier to this launch's first entry: > 0, nothing probed ran in between (an
            # unprobed kernel, or a launch's latency); < 0, it entered while an earlier launch ran.
            st["after"] = float("nan") if frontier is None else st["start"] - frontier
            frontier = st["start"] + st["span"] if frontier is None else max(frontier, st["start"] + st["span"])
            rows.append((b, rep, site, kth[site], tag, st))
            kth[site] += 1

    for b in sorted({r[0] for r in rows}):
        reps = sorted({r[1] for r in rows if r[0] == b})
        first = replays[(b, reps[0])]
        stamps = sum(len(m) for ctas in first.values() for m in ctas.values())
        print(f"batch {b}: {len(reps)} replays, {stamps} stamps a replay; SM clock from clock64 ~{sm_clock_mhz(first):.0f} MHz; "
              f"globaltimer steps of <= {timer_step_ns(first)} ns")
        # By site: launches a replay, then medians over every launch of every replay.
        by_site = collections.defaultdict(list)
        for r in rows:
            if r[0] == b:
                by_site[(r[2], r[5]["ctas"])].append(r)
        print("| site | launches a replay | CTAs | span µs | from wait µs | ramp µs | drain µs | "
              "mark: median / max µs after the CTA's entry |")
        print("|---|--:|--:|--:|--:|--:|--:|---|")
        for (site, _), rs in sorted(by_site.items(), key=lambda kv: -sum(r[5]["span"] for r in kv[1])):
            per = len(rs) / len(reps)
            # (marks in the order they come: by their median offset)
            ks = sorted({k for r in rs for k in r[5]["marks"]},
                        key=lambda k: median([r[5]["marks"][k][0] for r in rs if k in r[5]["marks"]]))
            marks = "; ".join(
                f"{mark_name(site, k)} {median([r[5]['marks'][k][0] for r in rs if k in r[5]['marks']]) / 1e3:.2f} / "
                f"{median([r[5]['marks'][k][1] for r in rs if k in r[5]['marks']]) / 1e3:.2f}" for k in ks)
            print(f"| {site} | {per:g} | {median([r[5]['ctas'] for r in rs]):.0f} | "
                  f"{median([r[5]['span'] for r in rs]) / 1e3:.2f} | {median([r[5]['from_wait'] for r in rs]) / 1e3:.2f} | "
                  f"{median([r[5]['ramp'] for r in rs]) / 1e3:.2f} | "
                  f"{median([r[5]['drain'] for r in rs]) / 1e3:.2f} | {marks} |")
        print()
        # The last CTA's chain, by site (median over launches): the marks from the launch's first entry.
        print("| site | CTAs | the last CTA's chain: mark at µs from the launch's first entry (medians over launches) |")
        print("|---|--:|---|")
        for (site, n), rs in sorted(by_site.items()):
            ks = sorted({k for r in rs for k in r[5].get("last_chain", {})},
                        key=lambda k: median([r[5]["last_chain"][k] for r in rs if k in r[5].get("last_chain", {})]))
            chain = "; ".join(
                f"{mark_name(site, k)} {median([r[5]['last_chain'][k] for r in rs if k in r[5].get('last_chain', {})]) / 1e3:.2f}"
                for k in ks)
            print(f"| {site} | {n} | {chain} |")
        print()
        if a.launches > 0:
            print(f"| # | site | k | CTAs | start µs | after µs | span µs | from wait µs | ramp µs | drain µs | "
                  f"last CTA (sm): chain µs | beside it on its SM |")
            print("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|")
            rs = [r for r in rows if r[0] == b and r[1] == reps[0]]
            for i, r in enumerate(sorted(rs, key=lambda r: r[5]["start"])[:a.launches]):
                st = r[5]
                chain = " ".join(f"{mark_name(r[2], k)}={v / 1e3:.2f}" for k, v in st.get("last_chain", {}).items())
                print(f"| {i} | {r[2]} | {r[3]} | {st['ctas']} | {st['start'] / 1e3:.1f} | {st['after'] / 1e3:.2f} | "
                      f"{st['span'] / 1e3:.2f} | "
                      f"{st['from_wait'] / 1e3:.2f} | {st['ramp'] / 1e3:.2f} | {st['drain'] / 1e3:.2f} | "
                      f"({st.get('last_sm', '-')}) {chain} | {st['beside']} |")
            print()
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["batch", "replay", "site", "kth", "tag", "ctas", "start_ns", "after_ns", "span_ns", "from_wait_ns",
                        "ramp_ns", "drain_ns", "beside"])
            for b, rep, site, k, tag, st in rows:
                w.writerow([b, rep, site, k, tag, st["ctas"], st["start"], st["after"], st["span"], st["from_wait"],
                            st["ramp"], st["drain"], st["beside"]])


if __name__ == "__main__":
    main()
