"""Loads a runner-written AdaLoRA adapter with peft and checks it against runner's merged model.

usage: python3 scripts/check_adalora_peft.py BASE_DIR ADAPTER_DIR MERGED_DIR
  BASE_DIR: the HF folder the adapter was trained on (e.g. .runner/.../base/model)
  ADAPTER_DIR, MERGED_DIR: the sft stage's adapter/ and merged/

1. peft.PeftModel.from_pretrained(base, ADAPTER_DIR) must load it (AdaLoraConfig, rank_pattern
   resizing, every lora_A/lora_E/lora_B key consumed).
2. its logits on a fixed token batch must equal those of MERGED_DIR loaded in transformers, and
   peft's merge_and_unload() weights must equal MERGED_DIR's (max abs difference printed).
"""
import sys

import torch
import transformers as tf
import peft
from safetensors.torch import load_file
import glob, os

base_dir, adapter_dir, merged_dir = sys.argv[1:4]
base = tf.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
model = peft.PeftModel.from_pretrained(base, adapter_dir)
cfg = model.peft_config["default"]
assert cfg.peft_type == peft.PeftType.ADALORA, cfg.peft_type
ranks = {n: sum(v) for n, v in (cfg.rank_pattern or {}).items()}
print("peft", peft.__version__, "loaded", adapter_dir, "ranks", sorted(set(ranks.values())), "sum", sum(ranks.values()))
model.eval()
ids = torch.arange(1, 33).reshape(2, 16) * 37 % base.config.vocab_size
with torch.no_grad():
    got = model(input_ids=ids).logits
merged = tf.AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
with torch.no_grad():
    want = merged(input_ids=ids).logits
print("logits: peft adapter vs runner merged max|diff|", (got - want).abs().max().item(), "max|logit|", want.abs().max().item())
unloaded = model.merge_and_unload().state_dict()
saved = {}
for f in glob.glob(os.path.join(merged_dir, "*.safetensors")):
    saved.update(load_file(f))
worst = max((unloaded[k].float() - v.float()).abs().max().item() for k, v in saved.items() if k in unloaded)
print("weights: peft merge_and_unload vs runner merged/ max|diff|", worst)
