#!/usr/bin/env python3
"""Greedy continuation by llama.cpp (llama-cpp-python): prints the generated token ids as JSON.

Usage: python3 scripts/llama_cpp_greedy.py MODEL.gguf "prompt" N_TOKENS
       python3 scripts/llama_cpp_greedy.py MODEL.gguf ids:1,2,3 N_TOKENS   (prompt token ids)
"""
import json
import sys

from llama_cpp import Llama


def main() -> None:
    llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False, seed=0)
    if sys.argv[2].startswith("ids:"):
        prompt = [int(t) for t in sys.argv[2][4:].split(",")]
    else:
        prompt = llm.tokenize(sys.argv[2].encode("utf-8"), add_bos=True, special=True)
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) >= int(sys.argv[3]):
            break
    print(json.dumps(out))


if __name__ == "__main__":
    main()
