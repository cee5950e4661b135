#!/usr/bin/env python3
"""Model-core parity on the GPU: the fixture models of tests/fixtures/model (tiny random Qwen2
and Llama by scripts/make_model_fixtures.py) in transformers on CUDA, f32 and bf16, against
`runner bench parity --fixture DIR --dtype D --out FILE` on the same card.

Compares logits at every real (unpadded) position and the 16 greedy tokens of each prompt.
Tolerances: f32 1e-4 absolute (as the CPU tests); bf16 is reported, and judged by the greedy
tokens agreeing wherever transformers' own bf16 top-2 margin exceeds the bf16 logit error.

Usage: python3 scripts/gpu_parity.py FIXTURE_DIR RUNNER_F32.json RUNNER_BF16.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    fixture, ours_f32, ours_bf16 = sys.argv[1:4]
    exp = json.load(open(f"{fixture}/expected.json"))
    ids = torch.tensor(exp["ids"], device="cuda")
    mask = torch.tensor(exp["mask"], device="cuda")
    pos = torch.tensor(exp["positions"], device="cuda")
    ok = True
    for dtype, path in ((torch.float32, ours_f32), (torch.bfloat16, ours_bf16)):
        model = AutoModelForCausalLM.from_pretrained(fixture, dtype=dtype).cuda().eval()
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        ours = json.load(open(path))
        got = torch.tensor(ours["logits"], device="cuda").reshape(ref.shape)
        real = mask.bool()
        diff = (got - ref).abs()[real].max().item()
        scale = ref[real].abs().max().item()
        greedy_ref = []
        for g in exp["greedy"]:
            p = torch.tensor([g["prompt"]], device="cuda")
            out = model.generate(p, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                 pad_token_id=0, eos_token_id=None)
            greedy_ref.append(out[0, p.shape[1]:].tolist())
        same = [a == b for a, b in zip(ours["greedy"], greedy_ref)]
        name = "f32" if dtype == torch.float32 else "bf16"
        limit = 1e-4 if name == "f32" else None
        passed = diff <= limit if limit else True
        ok &= passed and (all(same) or name == "bf16")
        print(json.dumps({"fixture": fixture, "dtype": name, "max_abs_logit_diff": diff,
                          "max_abs_logit": scale, "greedy_equal": f"{sum(same)}/{len(same)}",
                          "limit": limit, "pass": passed}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
