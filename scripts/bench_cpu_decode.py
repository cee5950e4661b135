#!/usr/bin/env python3
"""runner's CPU engine beside llama.cpp (llama-cpp-python) on one GGUF: prompt processing and
greedy decode tokens/s with the same thread count, on the same synthetic prompt.

runner: `runner bench cpu-decode --model M --threads N --prompt-tokens P --new-tokens K` (one
JSON line: prompt_tokens_per_s, decode_tokens_per_s, peak_rss_mib from VmHWM). llama.cpp: the
same prompt ids (token i is 1 + (i * 7919) % (vocab - 1), as src/infer/bench.rs) evaluated in one
batch, then K single-token evals, each next token the argmax of the last logits.

Both use busy threads: run on an otherwise idle machine (llama.cpp's spinning threads slow down
by orders of magnitude when other processes compete for the cores).

Usage: python3 scripts/bench_cpu_decode.py RUNNER_BIN MODEL.gguf [--threads 2] [--prompt-tokens 64] [--new-tokens 64]
"""
import argparse
import json
import subprocess
import time

import numpy as np
from llama_cpp import Llama


def llama_cpp_bench(model, threads, p, k):
    llm = Llama(model_path=model, n_ctx=p + k + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=max(p, 8), verbose=False)
    vocab = llm.n_vocab()
    ids = [1 + (i * 7919) % (vocab - 1) for i in range(p)]
    llm.reset()
    def last_logits():
        # llama-cpp-python keeps no scores without logits_all: read the context's last row.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    t = time.perf_counter()
    llm.eval(ids)
    pp = p / (time.perf_counter() - t)
    tok = int(np.argmax(last_logits()))
    out = [tok]
    t = time.perf_counter()
    for _ in range(k):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
        out.append(tok)
    dec = k / (time.perf_counter() - t)
    return {"prompt_tokens_per_s": round(pp, 1), "decode_tokens_per_s": round(dec, 1), "generated_ids": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runner")
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    res = subprocess.run([args.runner, "bench", "cpu-decode", "--model", args.model, "--threads",
                          str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                          "--new-tokens", str(args.new_tokens)],
                         check=True, capture_output=True, text=True)
    ours = json.loads(res.stdout.strip().splitlines()[-1])
    theirs = llama_cpp_bench(args.model, args.threads, args.prompt_tokens, args.new_tokens)
    same = sum(a == b for a, b in zip(ours["generated_ids"], theirs["generated_ids"]))
    print(json.dumps({
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "runner": {k: ours[k] for k in ("prompt_tokens_per_s", "decode_tokens_per_s", "peak_rss_mib",
                                        "model_file_mib", "peak_rss_over_file", "load_s")},
        "llama_cpp": {k: theirs[k] for k in ("prompt_tokens_per_s", "decode_tokens_per_s")},
        "decode_ratio": round(ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"], 3),
        "prompt_ratio": round(ours["prompt_tokens_per_s"] / theirs["prompt_tokens_per_s"], 3),
        "greedy_ids_equal_prefix": same,
    }))


if __name__ == "__main__":
    main()
