#!/usr/bin/env python3
"""Writes the reference fixtures of the `text` module with transformers' own code.

1. tests/fixtures/text/tiny_corpus.txt: a small zh/en corpus (first rows of the alpaca demo sets in
   /work/shared/data/alpaca, Apache-2.0).
2. tests/fixtures/text/tiny_tokenizer/: the init:tiny tokenizer trained by the Rust code on that
   corpus (`cargo test` with RUNNER_REGEN_FIXTURES=1 writes it; without the variable the same test
   checks that retraining reproduces it byte for byte).
3. tests/fixtures/text/chat_template_cases.json: Qwen2.5-Instruct and SmolLM2-Instruct chat
   templates rendered by `AutoTokenizer.apply_chat_template(tokenize=False)`.
4. tests/fixtures/text/encode_cases.json: `tokenizer(text)`, `tokenizer(text, add_special_tokens=False)`
   and `decode` results of AutoTokenizer on the tiny tokenizer.

Usage (from the crate root): pip install transformers jinja2 && python3 scripts/make_template_fixtures.py
"""

import json
import os
import subprocess
import sys
import tempfile

import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "text")
ALPACA = "/work/shared/data/alpaca"


def write_corpus():
    lines = []
    for name, n in (("alpaca_zh_demo.json", 120), ("alpaca_en_demo.json", 60)):
        with open(os.path.join(ALPACA, name), encoding="utf-8") as f:
            rows = json.load(f)[:n]
        for r in rows:
            lines.append("\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x))
    with open(os.path.join(FIX, "tiny_corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n\n".join(lines) + "\n")


def train_tiny_tokenizer():
    env = dict(os.environ, RUNNER_REGEN_FIXTURES="1")
    subprocess.run(
        ["cargo", "test", "--lib", "text::tests::tiny_tokenizer_fixture_is_reproducible"],
        cwd=ROOT, env=env, check=True,
    )


CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello! How are you?"}],
    "system_user_assistant": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "  Another one, with spaces  \n"},
        {"role": "assistant", "content": "Red."},
    ],
    "chinese": [
        {"role": "system", "content": "你是一个医生。"},
        {"role": "user", "content": "高血压患者能吃党参吗？"},
        {"role": "assistant", "content": "高血压病人可以口服党参的。"},
    ],
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询天气 \"now\"",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
            },
        },
    }
]

TOOL_CONVERSATION = [
    {"role": "user", "content": "北京天气？"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2}}}],
    },
    {"role": "tool", "content": "{\"temp\": 3.5}"},
    {"role": "assistant", "content": "3.5 度。"},
]


def template_cases(tok):
    cases = []
    for template_file in ("qwen2.5_instruct.jinja", "smollm2_instruct.jinja"):
        with open(os.path.join(FIX, template_file), encoding="utf-8") as f:
            source = f.read()
        tok.chat_template = source
        for conv_name, messages in CONVERSATIONS.items():
            for gen in (False, True):
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                cases.append({"template": template_file, "conversation": conv_name, "messages": messages,
                              "tools": None, "add_generation_prompt": gen, "expected": text})
        if template_file.startswith("qwen"):
            for gen in (False, True):
                text = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=gen)
                cases.append({"template": template_file, "conversation": "tools", "messages": TOOL_CONVERSATION,
                              "tools": TOOLS, "add_generation_prompt": gen, "expected": text})
    return cases


ENCODE_TEXTS = [
    "Hello world",
    "  leading spaces and trailing\n\n",
    "高血压患者能吃党参吗？",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|endoftext|>special tokens<|im_end|>",
    "emoji 🙂 and numbers 12345 and 'll 's",
    "Below is an instruction that describes a task.\n\n### Instruction:\nAdd.\n\n### Response:\n",
]


def encode_cases(tok):
    cases = []
    for text in ENCODE_TEXTS:
        ids = tok(text)["input_ids"]
        plain = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({
            "text": text,
            "ids": ids,
            "plain_ids": plain,
            "decoded": tok.decode(ids),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return cases


# Llama-3 style: the tokenizer.json post-processor prepends a BOS (here <|im_start|>, id 1).
BOS_POST_PROCESSOR = {
    "type": "Sequence",
    "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|im_start|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
        },
    ],
}


def bos_variant_cases():
    """The tiny tokenizer with BOS_POST_PROCESSOR and bos_token set, encoded by AutoTokenizer."""
    src = os.path.join(FIX, "tiny_tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        tj["post_processor"] = BOS_POST_PROCESSOR
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
        with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["bos_token"] = "<|im_start|>"
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False)
        tok = AutoTokenizer.from_pretrained(tmp)
        return {"post_processor": BOS_POST_PROCESSOR, "bos_token": "<|im_start|>", "cases": encode_cases(tok)}


def main():
    write_corpus()
    train_tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(os.path.join(FIX, "tiny_tokenizer"))
    meta = {"transformers": transformers.__version__}
    with open(os.path.join(FIX, "encode_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                   "cases": encode_cases(tok), "bos_variant": bos_variant_cases()}, f, ensure_ascii=False, indent=1)
    with open(os.path.join(FIX, "chat_template_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "special_tokens": tok.special_tokens_map, "cases": template_cases(tok)},
                  f, ensure_ascii=False, indent=1)
    print("wrote fixtures to", FIX, file=sys.stderr)


if __name__ == "__main__":
    main()
