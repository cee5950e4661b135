#!/usr/bin/env python3
"""runner vs llama.cpp (llama-cpp-python) on one GGUF model, on the CPU: prompt tokenization,
greedy tokens, and decode speed.

For each prompt: llama.cpp's tokenization (special tokens parsed, BOS only where the GGUF asks
for it) and its N greedy tokens, against `runner generate --greedy --json` on the same file.
Then decode tokens/s of both with the same thread count (runner's ndarray backend uses all cores
through rayon; llama.cpp gets `--threads`).

Usage: python3 scripts/compare_llama_cpp.py RUNNER_BIN MODEL.gguf [--tokens 8] [--bench-tokens 64] [--threads 2]
"""
import argparse
import json
import subprocess
import time

from llama_cpp import Llama

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
]


def llama_greedy(llm, prompt, n):
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out = []
    llm.reset()
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) >= n:
            break
    return ids, out


def runner_greedy(bin_, model, prompt, n):
    res = subprocess.run(
        [bin_, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", str(n),
         "--greedy", "--device", "cpu", "--json"],
        check=True, capture_output=True, text=True)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    return row["prompt_ids"], row["token_ids"], row["text"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runner")
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--bench-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llm = Llama(model_path=args.model, n_ctx=512, n_threads=args.threads, verbose=False, seed=0)
    agree = 0
    for p in PROMPTS:
        l_ids, l_out = llama_greedy(llm, p, args.tokens)
        r_ids, r_out, text = runner_greedy(args.runner, args.model, p, args.tokens)
        same = l_out == r_out
        agree += same
        print(json.dumps({"prompt": p, "prompt_ids_equal": l_ids == r_ids, "tokens_equal": same,
                          "llama_cpp": l_out, "runner": r_out, "runner_text": text}, ensure_ascii=False))
    print(f"greedy agreement: {agree}/{len(PROMPTS)} prompts")

    # Decode speed: a long greedy continuation, prompt processing excluded where possible.
    p = PROMPTS[1]
    ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    t0 = time.perf_counter()
    n = 0
    for _ in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        n += 1
        if n == 1:
            t1 = time.perf_counter()
        if n >= args.bench_tokens:
            break
    t2 = time.perf_counter()
    llama_tps = (n - 1) / (t2 - t1)
    # runner: time two runs (1 token and N tokens); the difference is N - 1 decode steps.
    def timed(k):
        t = time.perf_counter()
        res = subprocess.run([args.runner, "generate", "--model", args.model, "--prompt", p,
                              "--max-new-tokens", str(k), "--greedy", "--device", "cpu", "--json"],
                             check=True, capture_output=True, text=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        return time.perf_counter() - t, len(row["token_ids"])
    (one, _), (many, got) = timed(1), timed(args.bench_tokens)
    runner_tps = (got - 1) / (many - one)
    print(json.dumps({"decode_tokens_per_s": {"llama_cpp": round(llama_tps, 1), "runner": round(runner_tps, 1)},
                      "ratio_runner_over_llama_cpp": round(runner_tps / llama_tps, 3),
                      "threads": args.threads, "tokens": args.bench_tokens}))


if __name__ == "__main__":
    main()
