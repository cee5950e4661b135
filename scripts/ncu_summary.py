#!/usr/bin/env python3
"""Per-kernel GPU time of one profiled training step, from Nsight Compute's raw CSV.

On the GPU machine:
  RUNNER_PROFILE_STEP=4 ncu --profile-from-start off --metrics gpu__time_duration.sum \
      --csv --page raw runner bench sft --shape 0.5b --steps 3 > step.csv
  python3 scripts/ncu_summary.py step.csv [--top 40]
The trainer brackets step RUNNER_PROFILE_STEP with cuProfilerStart/Stop, so the CSV holds that
step's kernels alone (cuBLAS and NVRTC kernels included). ncu runs them one at a time, so the
sum is kernel time without overlap or launch gaps: compare it with the step's wall time.
"""
import argparse
import collections
import csv
import re
import sys


def rows(path):
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines()
    # ncu prints its own log lines (==PROF==) and the program's output before the table.
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"{path}: no ncu CSV table (no line starting with \"ID\")")
    table = list(csv.reader(lines[start:]))
    header, body = table[0], table[1:]
    name_col = header.index("Kernel Name")
    time_col = header.index("gpu__time_duration.sum")
    for r in body:
        if len(r) <= max(name_col, time_col):
            continue
        try:
            t = float(r[time_col].replace(",", ""))
        except ValueError:
            continue  # the units row
        yield r[name_col], t


def short(name):
    # Template arguments and parameter lists make every instantiation unique; keep the stem.
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name[:90]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--unit", default="ns", help="unit of gpu__time_duration (ncu's default: ns)")
    args = ap.parse_args()
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3}[args.unit]
    total, count = collections.Counter(), collections.Counter()
    order = []
    for name, t in rows(args.csv):
        s = short(name)
        total[s] += t * scale
        count[s] += 1
        order.append((s, t * scale))
    grand = sum(total.values())
    if not grand:
        sys.exit(f"{args.csv}: no kernels")
    print(f"kernel time {grand * 1e3:.2f} ms over {len(order)} launches")
    for name, t in total.most_common(args.top):
        print(f"{t * 1e3:8.3f} ms {100 * t / grand:5.1f}% {count[name]:6d}  {name}")
    # Launch-count buckets: where many tiny kernels add up.
    tiny = sum(t for _, t in order if t < 5e-6)
    n_tiny = sum(1 for _, t in order if t < 5e-6)
    print(f"kernels under 5 us: {n_tiny} launches, {tiny * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
