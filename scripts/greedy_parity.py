#!/usr/bin/env python3
"""Greedy decoding of runner against transformers, token by token, on runner's own prompt ids.

Each RUNNER_OUT is what `runner generate --json --greedy` wrote for PROMPTS (one JSON object per
prompt: prompt_ids, token_ids); transformers continues the same prompt ids greedily in float32 on
the GPU and the script prints, per prompt and per runner output, how many leading tokens agree.
Runner batches the prompts (left padding, KV cache); transformers runs them one at a time.

    runner generate --model M --prompts P.jsonl --chat --greedy --json --device cuda > gpu.jsonl
    python3 scripts/greedy_parity.py M P.jsonl gpu.jsonl [cpu.jsonl ...]
"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hf, prompts_path, outs = sys.argv[1], sys.argv[2], sys.argv[3:]
tok = AutoTokenizer.from_pretrained(hf)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).cuda().eval()
prompts = [json.loads(l) for l in open(prompts_path)]
runs = {o: [json.loads(l) for l in open(o)] for o in outs}
for i, p in enumerate(prompts):
    first = next(iter(runs.values()))[i]
    ids = torch.tensor([first["prompt_ids"]]).cuda()
    n = max(len(r[i]["token_ids"]) for r in runs.values())
    with torch.no_grad():
        g = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    ref = g[0, ids.shape[1]:].tolist()
    line = [f"prompt {i} ({len(first['prompt_ids'])} tokens)"]
    for o, r in runs.items():
        got = r[i]["token_ids"]
        same = 0
        while same < min(len(got), len(ref)) and got[same] == ref[same]:
            same += 1
        line.append(f"{o.split('/')[-1]}: {same}/{len(ref)} tokens agree")
    print("; ".join(line))
