"""Shared helpers for the metrics fixture and benchmark scripts.

`chatglm_sample` is ChatGLM-6B's ptuning/main.py `compute_metrics` body for one pair, with the
one documented deviation that an empty/whitespace-only prediction is scored by ROUGE as "-".
`perturbed_pairs` builds (prediction, reference) pairs from AdvertiseGen summaries.
"""
import json
import random

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

DEV_200 = "/work/shared/data/advertisegen/dev_200.json"

ENGLISH = [
    "This dress is simple and elegant, perfect for the summer.",
    "The jacket's denim fabric is soft - and it won't fade easily!",
    "Price: $129.99 (limited offer); sizes S/M/L & XL.",
    "I don't know.",
]
DIGIT_HEAVY = [
    "2019年新款 123456 3.5% 100-200元，尺码S/M/L，腰围68cm，裙长88.5cm。",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "共3色可选：黑色#000、白色#fff、红色#f00，满299减50。",
]
ODD_PUNCT = [
    "好看！！！真的好看？？？……是的。。。",
    "“简约”的设计，‘百搭’的风格。”然后呢？",
    "这款裙子......非常好看......值得购买",
    "上衣\n\n下装\r\n搭配   非常\t好看\u3000时尚",
    "\x1c分隔符\x1d测试\x1e",
]


def load_summaries(path=DEV_200):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["summary"] for line in f if line.strip()]


def load_contents(path=DEV_200):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["content"] for line in f if line.strip()]


def delete_chars(rng, text, k):
    chars = list(text)
    for _ in range(min(k, max(len(chars) - 1, 0))):
        del chars[rng.randrange(len(chars))]
    return "".join(chars)


def swap_chars(rng, text, k):
    chars = list(text)
    if len(chars) < 2:
        return text
    for _ in range(k):
        i = rng.randrange(len(chars) - 1)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def shuffle_clauses(rng, text):
    parts = [p for p in text.replace("。", "，").split("，") if p]
    rng.shuffle(parts)
    return "，".join(parts) + "。"


def perturb(rng, i, ref, refs, contents):
    """One prediction for reference `ref`; the kind cycles with i so every kind is covered."""
    kind = i % 14
    if kind == 0:
        return "identical", ref
    if kind == 1:
        return "delete", delete_chars(rng, ref, rng.randint(1, 12))
    if kind == 2:
        return "swap", swap_chars(rng, ref, rng.randint(1, 10))
    if kind == 3:
        return "truncate", ref[: rng.randint(1, max(1, len(ref) // 2))]
    if kind == 4:
        return "other-sample", refs[(i * 7 + 3) % len(refs)]
    if kind == 5:
        return "delete+swap", swap_chars(rng, delete_chars(rng, ref, 20), 20)
    if kind == 6:
        return "content", contents[i % len(contents)]
    if kind == 7:
        return "shuffle-clauses", shuffle_clauses(rng, ref)
    if kind == 8:
        return "repeat", ref + ref
    if kind == 9:
        return "truncate-short", ref[: rng.randint(1, 4)]
    if kind == 10:
        return "english", ENGLISH[i % len(ENGLISH)]
    if kind == 11:
        return "digits", DIGIT_HEAVY[i % len(DIGIT_HEAVY)]
    if kind == 12:
        return "odd-punct", ODD_PUNCT[i % len(ODD_PUNCT)] + ref[: rng.randint(0, 30)]
    return "mixed-head", ref[: len(ref) // 3] + "\n" + refs[(i + 1) % len(refs)][:40]


def special_pairs(refs):
    """Edge cases appended after the perturbed ones: (kind, prediction, reference)."""
    out = [
        ("empty", "", refs[0]),
        ("empty", "", refs[1]),
        ("whitespace", "   ", refs[2]),
        ("whitespace", " \n\t \u3000 ", refs[3]),
        ("single-char", refs[4][0], refs[4]),
        ("single-char-miss", "龘", refs[5]),
        ("two-chars", refs[6][:2], refs[6]),
        ("three-chars", refs[7][:3], refs[7]),
        ("dash", "-", refs[8]),
        ("newlines-ref", refs[9][:20], refs[9][:10] + "\n\n" + refs[9][10:]),
        ("newlines-both", "上衣\n \n下装", "上衣\n\n下装很好看"),
        ("rare-cjk", "𠀀𠀁這款裙子很好看鿕鿖", refs[10]),
        ("english-both", "the cat sat on the mat.", "the cat is on the mat."),
        ("english-both", "It is a guide to action.", "It is a guide to action."),
        ("long", (refs[11] * 5)[:600], refs[11]),
    ]
    return out


def perturbed_pairs(n_rounds=1, seed=1234):
    """(kind, prediction, reference) for every dev sample, n_rounds times, then the special cases."""
    refs = load_summaries()
    contents = load_contents()
    rng = random.Random(seed)
    pairs = []
    for r in range(n_rounds):
        for i, ref in enumerate(refs):
            kind, pred = perturb(rng, i + r * 5, ref, refs, contents)
            pairs.append((kind, pred, ref))
    return pairs + special_pairs(refs)


def chatglm_sample(pred, label):
    """Per-sample (bleu-4, rouge-1, rouge-2, rouge-l), each x100 and rounded as ChatGLM does."""
    hypothesis = " ".join(jieba.cut(pred))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.strip():
        hypothesis = "-"
    scores = Rouge().get_scores(hypothesis, reference)[0]
    bleu = sentence_bleu(
        [list(label)], list(pred), smoothing_function=SmoothingFunction().method3
    )
    return (
        round(bleu * 100, 4),
        round(scores["rouge-1"]["f"] * 100, 4),
        round(scores["rouge-2"]["f"] * 100, 4),
        round(scores["rouge-l"]["f"] * 100, 4),
    )


def bench_pairs(n=1070, seed=4321):
    """n (kind, prediction, reference) pairs: perturbation rounds over the 200 samples, then the
    special cases last."""
    refs = load_summaries()
    specials = special_pairs(refs)
    rounds = (n - len(specials)) // len(refs) + 1
    pairs = perturbed_pairs(n_rounds=rounds, seed=seed)[: rounds * len(refs)]
    return pairs[: n - len(specials)] + specials
