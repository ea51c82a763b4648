#!/usr/bin/env python3
"""Compare two logits arrays (e.g. the NumPy oracle vs the engine).

  python3 compare_logits.py --a ref.npy --b engine.npy [--rows-a 319:399] [--rows-b 0:80]
                            [--atol 0.05] [--rtol 0.02] [--min-cos 0.999] [--min-argmax 1.0]

Arrays of any rank are flattened to [rows, vocab] (e.g. the engine's [1, N, vocab]
dump). Row slices (python style i:j, either end optional) are applied after
flattening. Reports, per row and overall:
  * max |a-b|
  * max relative diff = max|a-b| / max|a_row| (relative to that row's logit scale)
  * cosine similarity
  * argmax agreement (and whether a disagreement is a near-tie in `a`)
Passes iff every row has max|a-b| <= atol + rtol * max|a_row| (unless --atol/--rtol are
negative), cosine >= --min-cos, and the argmax agreement fraction >= --min-argmax.
Exit status 0 = pass, 1 = fail, 2 = usage/shape error.
"""
import argparse
import sys

import numpy as np


def parse_slice(s, n):
    if not s:
        return slice(0, n)
    parts = s.split(":")
    if len(parts) == 1:
        i = int(parts[0])
        return slice(i, i + 1)
    a = int(parts[0]) if parts[0] else None
    b = int(parts[1]) if parts[1] else None
    return slice(a, b)


def as_rows(x):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        return x[None, :]
    return x.reshape(-1, x.shape[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="reference .npy")
    ap.add_argument("--b", required=True, help="candidate .npy")
    ap.add_argument("--rows-a", default="", help="row slice i:j of a (after flattening)")
    ap.add_argument("--rows-b", default="", help="row slice i:j of b (after flattening)")
    ap.add_argument("--atol", type=float, default=0.05)
    ap.add_argument("--rtol", type=float, default=0.02,
                    help="tolerance relative to each row's max |a|")
    ap.add_argument("--min-cos", type=float, default=0.999)
    ap.add_argument("--min-argmax", type=float, default=1.0,
                    help="minimum fraction of rows whose argmax agrees")
    ap.add_argument("--tie-margin", type=float, default=0.0,
                    help="argmax disagreements whose top-2 gap in a is <= this are tolerated")
    ap.add_argument("--per-row", action="store_true", help="print every row")
    args = ap.parse_args(argv)

    a = as_rows(np.load(args.a))
    b = as_rows(np.load(args.b))
    a = a[parse_slice(args.rows_a, a.shape[0])]
    b = b[parse_slice(args.rows_b, b.shape[0])]
    if a.shape != b.shape:
        print(f"shape mismatch after slicing: a {a.shape} vs b {b.shape}")
        return 2
    if a.size == 0:
        print("nothing to compare")
        return 2
    finite = np.isfinite(a).all() and np.isfinite(b).all()

    diff = np.abs(a - b)
    maxdiff = diff.max(axis=1)
    scale = np.abs(a).max(axis=1)
    rel = maxdiff / np.maximum(scale, 1e-30)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    am_a = a.argmax(1)
    am_b = b.argmax(1)
    agree = am_a == am_b
    srt = np.sort(a, axis=1)
    gap = srt[:, -1] - srt[:, -2] if a.shape[1] > 1 else np.full(a.shape[0], np.inf)
    # a disagreement is a near-tie if b's pick is within max|a-b| of a's top in a
    a_at_b = a[np.arange(a.shape[0]), am_b]
    near_tie = (~agree) & ((a[np.arange(a.shape[0]), am_a] - a_at_b) <= np.maximum(args.tie_margin, 0))
    ok_agree = agree | near_tie

    tol_ok = np.ones(a.shape[0], dtype=bool)
    if args.atol >= 0 and args.rtol >= 0:
        tol_ok = maxdiff <= args.atol + args.rtol * scale

    R = a.shape[0]
    print(f"rows compared        : {R}  (vocab {a.shape[1]})")
    print(f"max |a-b|            : {maxdiff.max():.6g}  (row {int(maxdiff.argmax())}); mean of row maxima {maxdiff.mean():.6g}")
    print(f"max rel diff         : {rel.max():.6g}  (relative to the row's max|a|; median {np.median(rel):.6g})")
    print(f"logit scale max|a|   : median {np.median(scale):.6g}, min {scale.min():.6g}")
    print(f"cosine similarity    : min {cos.min():.9f} (row {int(cos.argmin())}), mean {cos.mean():.9f}")
    print(f"argmax agreement     : {int(agree.sum())}/{R}"
          + (f" (+{int(near_tie.sum())} tolerated near-ties)" if near_tie.any() else ""))
    bad = np.nonzero(~agree)[0]
    for r in bad[:20]:
        print(f"  row {r}: argmax a={am_a[r]} b={am_b[r]}; a top-2 gap {gap[r]:.4g}; "
              f"a[a_top]-a[b_top]={a[r, am_a[r]] - a_at_b[r]:.4g}; max|a-b| {maxdiff[r]:.4g}")
    if args.per_row:
        for r in range(R):
            print(f"  row {r}: maxdiff {maxdiff[r]:.4g} rel {rel[r]:.4g} cos {cos[r]:.9f} "
                  f"argmax {am_a[r]}/{am_b[r]}")

    fails = []
    if not finite:
        fails.append("non-finite values")
    if not tol_ok.all():
        fails.append(f"{int((~tol_ok).sum())} rows exceed atol+rtol*max|a| "
                     f"(first: row {int(np.nonzero(~tol_ok)[0][0])})")
    if cos.min() < args.min_cos:
        fails.append(f"min cosine {cos.min():.6f} < {args.min_cos}")
    if ok_agree.mean() < args.min_argmax:
        fails.append(f"argmax agreement {ok_agree.mean():.4f} < {args.min_argmax}")
    if fails:
        print("FAIL: " + "; ".join(fails))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
