"""Writes the parity fixtures for src/metrics (run from the crate root).

    pip install nltk rouge_chinese jieba sacrebleu numpy
    python3 scripts/make_metrics_fixtures.py

Outputs (tests/fixtures/metrics/):
  chatglm_pairs.jsonl   one row per pair: kind, prediction, reference and the per-sample
                        ChatGLM-6B scores (bleu-4, rouge-1, rouge-2, rouge-l; x100, rounded to 4).
  chatglm_totals.json   np.mean of each column, as ChatGLM's compute_metrics reports them.
  sacrebleu.json        sacrebleu.corpus_bleu scores (tokenize 13a and zh, defaults otherwise)
                        on several subsets of the same pairs plus an English set.
"""
import json
import os
import sys
import warnings

import jieba
import numpy as np
import sacrebleu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from metrics_pairs import chatglm_sample, perturbed_pairs  # noqa: E402

OUT = "tests/fixtures/metrics"

ENGLISH_CORPUS = [
    ("The cat sat on the mat.", "The cat is on the mat."),
    ("It's a guide to action, which ensures that the military always obeys.",
     "It is a guide to action that ensures that the military will forever heed Party commands."),
    ("Prices rose 3.5% in 2019-2020; the U.S. economy grew by $1,200.",
     "Prices rose by 3.5% in 2019 - 2020, and the US economy grew $1,200."),
    ("He said &quot;hello&quot; &amp; left <skipped> early.", "He said \"hello\" & left early."),
    ("A well-known state-of-the-art model (v2.1) [beta] {test} ~ok~ `code`.",
     "A well known state of the art model (v2.1) [beta]."),
    ("Line one-\nline two\nend", "Line oneline two end"),
    ("", "Nothing was predicted here."),
    ("Short.", "A much longer reference sentence that goes on and on."),
    ("12-34 5.6,7 8,9.0 a.b c,d .e ,f", "12 - 34 5.6,7 8,9.0 a . b c , d . e , f"),
    ("“Quoted” — text… with ‘curly’ marks", "“Quoted” — text… with ‘curly’ marks"),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    jieba.initialize()
    warnings.simplefilter("ignore")
    pairs = perturbed_pairs()
    cols = {"bleu-4": [], "rouge-1": [], "rouge-2": [], "rouge-l": []}
    with open(f"{OUT}/chatglm_pairs.jsonl", "w", encoding="utf-8") as f:
        for kind, pred, ref in pairs:
            b, r1, r2, rl = chatglm_sample(pred, ref)
            row = {"kind": kind, "prediction": pred, "reference": ref,
                   "bleu-4": b, "rouge-1": r1, "rouge-2": r2, "rouge-l": rl}
            for k in cols:
                cols[k].append(row[k])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    totals = {k: float(np.mean(v)) for k, v in cols.items()}
    totals["count"] = len(pairs)
    with open(f"{OUT}/chatglm_totals.json", "w") as f:
        json.dump(totals, f, indent=1)
    print("chatglm", totals)

    preds = [p for _, p, _ in pairs]
    refs = [r for _, _, r in pairs]
    en_preds = [p for p, _ in ENGLISH_CORPUS]
    en_refs = [r for _, r in ENGLISH_CORPUS]
    subsets = {
        "all": (0, len(pairs)),
        "first-50": (0, 50),
        "special": (len(pairs) - 15, len(pairs)),
    }
    cases = []
    for name, (lo, hi) in subsets.items():
        cases.append((name, preds[lo:hi], refs[lo:hi]))
    cases.append(("english", en_preds, en_refs))
    cases.append(("english-single-empty", [""], ["Nothing here."]))
    cases.append(("english-no-match", ["zzz yyy"], ["aaa bbb ccc"]))
    out = []
    for name, hyps, rs in cases:
        row = {"name": name}
        if name.startswith("english"):
            row["predictions"], row["references"] = hyps, rs
        else:
            row["range"] = list(subsets[name])
        for tok in ("13a", "zh"):
            row[tok] = sacrebleu.corpus_bleu(hyps, [rs], tokenize=tok).score
        out.append(row)
    with open(f"{OUT}/sacrebleu.json", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    for row in out:
        print(row["name"], row["13a"], row["zh"])


if __name__ == "__main__":
    main()
