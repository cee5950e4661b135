"""Benchmark (not a test): ChatGLM-6B metrics in Python vs `runner score`'s Rust implementation.

    pip install nltk rouge_chinese jieba numpy
    cargo build --release --example score_bench
    python3 scripts/bench_score.py [--pairs 1070] [--jieba-diff]

Writes the pairs to /tmp/bench_pairs.jsonl ({prompt, prediction, reference}), times the Python
reference (scripts/metrics_pairs.py `chatglm_sample` per pair + np.mean, jieba dictionary loaded
before timing), then runs target/release/examples/score_bench on the same file (which times its
jieba construction separately from scoring) and prints both, the ratio and whether means agree.
--jieba-diff compares ' '.join(jieba.cut(text)) of every text with jieba-rs and lists differences.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import jieba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from metrics_pairs import bench_pairs, chatglm_sample  # noqa: E402

PAIRS = "/tmp/bench_pairs.jsonl"
BENCH = os.environ.get("SCORE_BENCH", "target/release/examples/score_bench")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1070)
    ap.add_argument("--jieba-diff", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    pairs = bench_pairs(args.pairs)
    with open(PAIRS, "w", encoding="utf-8") as f:
        for kind, pred, ref in pairs:
            f.write(json.dumps({"prompt": kind, "prediction": pred, "reference": ref},
                               ensure_ascii=False) + "\n")

    if args.jieba_diff:
        texts = sorted({t for _, p, r in pairs for t in (p, r)})
        out = subprocess.run([BENCH, "--dump-jieba", PAIRS], check=True,
                             capture_output=True, text=True).stdout
        rust = json.loads(out)
        diffs = [(t, " ".join(jieba.cut(t)), rust[t]) for t in texts
                 if " ".join(jieba.cut(t)) != rust[t]]
        print(f"jieba: {len(texts)} distinct texts, {len(diffs)} differ")
        for t, py, rs in diffs[:20]:
            print(json.dumps({"text": t, "python": py, "rust": rs}, ensure_ascii=False))
        return

    jieba.initialize()
    t0 = time.perf_counter()
    cols = [[], [], [], []]
    for _, pred, ref in pairs:
        for col, v in zip(cols, chatglm_sample(pred, ref)):
            col.append(v)
    py_means = [float(np.mean(c)) for c in cols]
    py_secs = time.perf_counter() - t0
    print(f"python: {len(pairs)} pairs in {py_secs:.3f} s; means {py_means}")

    results = {}
    for threads in (1, 0):
        out = subprocess.run([BENCH, "--threads", str(threads), PAIRS], check=True,
                             capture_output=True, text=True).stdout
        results[threads] = json.loads(out.strip().splitlines()[-1])
    for threads, r in results.items():
        label = "1 thread" if threads == 1 else "all cores"
        rs_means = [r["bleu-4"], r["rouge-1"], r["rouge-2"], r["rouge-l"]]
        agree = max(abs(a - b) for a, b in zip(py_means, rs_means))
        print(f"rust ({label}): jieba build {r['jieba_build_s']:.3f} s, scoring {r['score_s']:.4f} s "
              f"-> {py_secs / r['score_s']:.1f}x faster (incl. jieba build: "
              f"{py_secs / (r['score_s'] + r['jieba_build_s']):.1f}x); max |mean diff| {agree:.2e}")


if __name__ == "__main__":
    main()
