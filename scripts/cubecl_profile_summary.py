#!/usr/bin/env python3
"""Per-kernel GPU time totals from a cubecl profiling log.

Produce the log on the GPU machine with, e.g.
  CUBECL_DEBUG_LOG=/tmp/prof.log CUBECL_DEBUG_OPTION=profile runner bench sft --shape 0.5b --steps 2
then: python3 scripts/cubecl_profile_summary.py /tmp/prof.log [--top 60]
Each kernel is timed on its own (profiling serializes them), so the totals are kernel time, not
wall time; cuBLAS calls do not appear.
"""
import argparse
import collections
import re

UNIT = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.*)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=60)
    args = ap.parse_args()
    total, count = collections.Counter(), collections.Counter()
    with open(args.log, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            name = m.group(3).strip()[:120]
            total[name] += float(m.group(1)) * UNIT[m.group(2)]
            count[name] += 1
    grand = sum(total.values())
    if not grand:
        raise SystemExit(f"{args.log}: no profiled kernels (was CUBECL_DEBUG_OPTION=profile set?)")
    print(f"total kernel time {grand:.3f} s over {sum(count.values())} launches")
    for name, t in total.most_common(args.top):
        print(f"{t:8.4f} s {100 * t / grand:5.1f}% {count[name]:6d}  {name}")


if __name__ == "__main__":
    main()
