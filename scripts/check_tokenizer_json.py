#!/usr/bin/env python3
"""Encodes every fixture prompt with a tokenizer.json through HF `tokenizers` (the same Rust
library transformers uses) and compares with the llama.cpp ids of the fixture.
Prints a JSON report {"mismatches": [...], "decode_mismatches": [...], "n": N}.

Usage: python3 scripts/check_tokenizer_json.py tokenizer.json fixture.json
"""
import json
import sys

from tokenizers import Tokenizer


def main() -> None:
    tok = Tokenizer.from_file(sys.argv[1])
    cases = json.load(open(sys.argv[2], encoding="utf-8"))
    bad, bad_decode = [], []
    for c in cases:
        ids = tok.encode(c["text"], add_special_tokens=True).ids
        if ids != c["ids"]:
            bad.append({"text": c["text"], "got": ids, "llama.cpp": c["ids"]})
        if tok.decode(ids, skip_special_tokens=False) != c["text"]:
            bad_decode.append(c["text"])
    print(json.dumps({"n": len(cases), "mismatches": bad, "decode_mismatches": bad_decode}, ensure_ascii=False))


if __name__ == "__main__":
    main()
