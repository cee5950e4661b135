#!/usr/bin/env python3
"""A randomly initialised Qwen2.5-0.5B-shaped HF folder with a given tokenizer, for GPU runs of
recipes at that shape without a model hub (GRPO timing: the weights are random, so rewards are not
meaningful). The vocabulary is the tokenizer's (SmolLM2's: 49,152).

  python3 scripts/make_random_qwen05.py OUT_DIR TOKENIZER_DIR
  runner run recipes/gsm8k-grpo.toml --only train_raw --only train_prompts --only base --only grpo \
      --set stages.base.source=OUT_DIR --set stages.grpo.max_steps=3 --set stages.grpo.precision=bf16
TOKENIZER_DIR holds tokenizer.json, tokenizer_config.json and generation_config.json (e.g. what
`runner` writes for the SmolLM2 GGUF in the `base` stage's artifact).
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    out, tok = Path(sys.argv[1]), Path(sys.argv[2])
    vocab = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        if (tok / name).exists():
            shutil.copy(tok / name, out)


if __name__ == "__main__":
    main()
