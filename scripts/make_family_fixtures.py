"""Tiny random models of every decoder family runner reads, with transformers' greedy tokens.

Writes tests/fixtures/families/<name>/ (or $OUT/<name>): config.json, model.safetensors (f32),
tokenizer.json + tokenizer_config.json (a byte-level BPE trained here), generation_config.json,
and expected.json:
  - prompts: [{text, ids, tokens (greedy, up to 16 new tokens, stops at EOS), min_margin}]
  - batch: the same prompts left-padded in one batch: {tokens: [[...]]}
  - logits: {ids, values [T, V]} f32 logits of the first prompt followed by its greedy tokens
Run on the CPU in f32 with transformers 5 (5.25 here): `python scripts/make_family_fixtures.py`.
"""
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Glm4Config, GlmConfig,
                          LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen3Config)

OUT = os.environ.get("OUT", "tests/fixtures/families")
torch.set_grad_enabled(False)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a language model needs data, a schedule and patience.",
    "高血压患者应该注意饮食，少吃盐，多运动。",
    "癫痫是一种常见的神经系统疾病。",
    "def add(a, b):\n    return a + b\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "Attention is all you need; rotary embeddings encode positions.",
] * 20

PROMPTS = [
    "The quick brown fox",
    "Fine-tuning a language model needs data, a schedule and patience, said the engineer.",
    "高血压患者应该注意什么？",
    "def add(a, b):",
    "Attention",
]

SPECIALS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2


def tokenizer(add_bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def common(vocab):
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def families(vocab):
    c = common(vocab)
    return {
        "qwen3": (Qwen3Config(**c, num_hidden_layers=3, head_dim=16, tie_word_embeddings=False,
                              rope_theta=10000.0), False),
        "mistral_sliding": (MistralConfig(**c, num_hidden_layers=2, sliding_window=8), True),
        "llama3_rope": (LlamaConfig(**c, num_hidden_layers=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), True),
        "gemma2": (Gemma2Config(**c, num_hidden_layers=4, head_dim=16, sliding_window=8,
                                query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
                                final_logit_softcapping=6.0), True),
        "gemma3": (Gemma3TextConfig(**c, num_hidden_layers=6, head_dim=16, sliding_window=8,
                                    query_pre_attn_scalar=24, rope_parameters={
                                        "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                           "rope_theta": 1000000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
                   True),
        "glm4": (Glm4Config(**c, num_hidden_layers=2, head_dim=16, attention_bias=True), False),
        "glm": (GlmConfig(**c, num_hidden_layers=2, head_dim=16, attention_bias=True), False),
    }


def perturb(m, gemma):
    # Default init gives near-flat logits; widen it so greedy choices have margins and every
    # weight (norms, biases) matters.
    for n, p in m.named_parameters():
        if "norm" in n:
            p.copy_((0 if gemma else 1) + 0.3 * torch.randn_like(p))
        elif n.endswith("bias"):
            p.copy_(0.2 * torch.randn_like(p))
        else:
            p.normal_(0, 0.15)


def greedy(m, ids, eos):
    seq, toks, margin = list(ids), [], 1e9
    for _ in range(16):
        last = m(input_ids=torch.tensor([seq])).logits[0, -1].float()
        top = last.topk(2).values
        margin = min(margin, (top[0] - top[1]).item())
        t = int(last.argmax())
        toks.append(t)
        seq.append(t)
        if t == eos:
            break
    return toks, margin


def build(name, cfg, add_bos):
    tok = tokenizer(add_bos)
    eos = cfg.eos_token_id
    # The first seed whose greedy choices all win by >= 1e-3 (no near-ties for f32 noise to flip).
    for seed in range(1234, 1334):
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(cfg).float().eval()
        m.config._attn_implementation = "eager"
        perturb(m, cfg.model_type.startswith("gemma"))
        runs = [greedy(m, tok(text).input_ids, eos) for text in PROMPTS]
        if min(margin for _, margin in runs) >= 1e-3:
            break
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    m.save_pretrained(d)
    tok.save_pretrained(d)
    prompts = []
    for text, (toks, margin) in zip(PROMPTS, runs):
        ids = tok(text).input_ids
        out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
        gen = out[0, len(ids):].tolist()
        assert gen[:len(toks)] == toks, (name, text, gen, toks)
        prompts.append({"text": text, "ids": ids, "tokens": toks, "min_margin": margin})
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = m.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
    batch = []
    for row in out[:, enc.input_ids.shape[1]:].tolist():
        if eos in row:
            row = row[:row.index(eos) + 1]
        batch.append(row)
    first = prompts[0]["ids"] + prompts[0]["tokens"]
    lg = m(input_ids=torch.tensor([first])).logits[0].float()
    expected = {"prompts": prompts, "batch": {"tokens": batch},
                "logits": {"ids": first, "values": [[round(v, 6) for v in r] for r in lg.tolist()]}}
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f)
    print(name, "min margin", min(p["min_margin"] for p in prompts),
          "prompt lengths", [len(p["ids"]) for p in prompts])


def main():
    vocab = len(tokenizer(False))
    for name, (cfg, add_bos) in families(vocab).items():
        build(name, cfg, add_bos)


if __name__ == "__main__":
    main()
