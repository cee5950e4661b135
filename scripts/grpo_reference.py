#!/usr/bin/env python3
"""GRPO as TRL's GRPOTrainer computes it, in plain PyTorch + transformers + peft, to compare
runner's learning curve with a reference on the same model, prompts and hyper-parameters.

What it does per step (TRL's GRPOTrainer with loss_type "grpo", num_iterations 1, beta > 0):
one prompt (a seeded shuffle of the train file), `--generations` completions sampled with the
LoRA adapter on (temperature, top-p 1, no top-k, `--max-completion` tokens, cut after the first
EOS), the five R1-style rewards of scripts/rewards_fixture.py on response_prefix + completion,
advantages (r - mean) / (std + 1e-4) with Bessel's std, per-token log-probs at the sampling
temperature, the k3 KL to the same model with the adapter off, the loss
mean over completions of (masked token mean of -A * exp(logp - logp.detach()) + beta * kl),
gradient clipping, AdamW, cosine schedule with warmup (transformers' schedule).

The defaults are recipes/gsm8k-grpo.toml's. The model is an HF folder (runner convert --to hf
models/SmolLM2-135M-Instruct.Q4_1.gguf DIR writes one from the GGUF).

    runner convert --to hf models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol_hf
    python3 scripts/grpo_reference.py --model /tmp/smol_hf --steps 30 --seed 8 --out ref-8.jsonl
    runner run recipes/gsm8k-grpo.toml --store /tmp/st-5 --set stages.grpo.seed=5 \
        --set stages.grpo.max_steps=30 --only train_raw --only train_prompts --only base --only grpo
    python3 scripts/grpo_reference.py --summary ref-*.jsonl /tmp/st-*/*/metrics.jsonl
    python3 scripts/grpo_reference.py --model /tmp/smol_hf --evaluate base /tmp/st-5/*/adapter

Metrics rows use runner's keys (step, reward, rewards/<name>, reward_std, kl, completion_length,
loss, grad_norm, lr), so --summary reads both.
"""

import argparse
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewards_fixture import correctness, count_xml, int_reward, soft_format, strict_format  # noqa: E402

SYSTEM = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
REWARDS = [
    ("xml_count", lambda c, r: count_xml(c)),
    ("soft_format", soft_format),
    ("strict_format", strict_format),
    ("int", int_reward),
    ("correctness", correctness),
]
FORMAT = ["xml_count", "soft_format", "strict_format"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--data", default="data/gsm8k/train.jsonl")
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-completion", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--max-grad-norm", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=64)
    p.add_argument("--response-prefix", default="<reasoning>\n")
    p.add_argument("--save-adapter", help="write the trained LoRA adapter (peft) here")
    p.add_argument("--evaluate", nargs="+", metavar="ADAPTER",
                   help="mean rewards of the policy with each peft adapter folder ('base': none) on "
                        "--eval-data, --eval-samples completions a prompt, the same random draws for each")
    p.add_argument("--eval-data", default="data/gsm8k/test.jsonl")
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--summary", nargs="+", metavar="METRICS_JSONL",
                   help="print first-k / last-k means of the format rewards of these runs")
    p.add_argument("--window", type=int, default=10, help="steps averaged at each end (--summary)")
    return p.parse_args()


def train(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=args.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * args.steps), args.steps)

    records = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rng = random.Random(args.seed)
    order = []
    out = open(args.out, "w")
    for step in range(args.steps):
        t0 = time.time()
        if not order:
            order = list(range(len(records)))
            rng.shuffle(order)
        rec = records[order.pop(0)]
        text = prompt_text(tok, rec["question"], args.response_prefix)
        prompt = tok(text, add_special_tokens=False)["input_ids"][-args.max_prompt:]
        ids = torch.tensor([prompt] * args.generations, device=device)
        model.eval()
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=args.temperature, top_p=1.0, top_k=0,
                                  max_new_tokens=args.max_completion, eos_token_id=eos, pad_token_id=pad)
        completion = seqs[:, len(prompt):]
        is_eos = completion == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], completion.shape[1],
                                                                                  dtype=torch.long))
        mask = (torch.arange(completion.shape[1], device=device)[None, :] <= first[:, None]).float()
        texts = [args.response_prefix + tok.decode(c[: int(m.sum())], skip_special_tokens=True)
                 for c, m in zip(completion, mask)]
        scores = {name: [fn(t, rec["answer"]) for t in texts] for name, fn in REWARDS}
        totals = torch.tensor([sum(scores[n][i] for n, _ in REWARDS) for i in range(len(texts))], device=device)
        adv = (totals - totals.mean()) / (totals.std() + 1e-4)

        seqs = torch.cat([torch.tensor([prompt] * args.generations, device=device), completion], 1)
        attn = torch.cat([torch.ones(args.generations, len(prompt), device=device), mask], 1).long()

        def logps(m):
            logits = m(input_ids=seqs, attention_mask=attn).logits[:, len(prompt) - 1:-1] / args.temperature
            return torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1)

        with torch.no_grad(), model.disable_adapter():
            ref = logps(model)
        model.train()
        logp = logps(model)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = -adv[:, None] * torch.exp(logp - logp.detach()) + args.beta * kl
        loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        row = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
               "reward": totals.mean().item(), "reward_std": totals.std().item(),
               "kl": ((kl * mask).sum() / mask.sum()).item(), "completion_length": mask.sum(1).mean().item(),
               "step_s": time.time() - t0}
        row.update({f"rewards/{n}": sum(v) / len(v) for n, v in scores.items()})
        out.write(json.dumps(row) + "\n")
        out.flush()
        if step == 0 or (step + 1) % 10 == 0:
            print(json.dumps({"sample": texts[0][:300], **{k: row[k] for k in ["step", "reward", "kl"]}}))
    out.close()
    if args.save_adapter:
        model.save_pretrained(args.save_adapter)


def prompt_text(tok, question, prefix):
    return tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                                   tokenize=False, add_generation_prompt=True) + prefix


def evaluate(args):
    """Expected rewards of each policy, estimated on many completions: far less noisy than one
    training step's six, so two trainers' 30-step adapters can be compared."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    records = [json.loads(line) for line in open(args.eval_data, encoding="utf-8") if line.strip()]
    texts = [prompt_text(tok, r["question"], args.response_prefix) for r in records]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    ids = batch["input_ids"].repeat_interleave(args.eval_samples, 0)
    attn = batch["attention_mask"].repeat_interleave(args.eval_samples, 0)
    print(f"{'policy':<60} completions  " + "  ".join(f"{n:>13}" for n, _ in REWARDS) + "  format")
    for name in args.evaluate:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).to(device)
        if name != "base":
            model = PeftModel.from_pretrained(model, name).to(device)
        model.eval()
        torch.manual_seed(args.seed)
        scores = {n: [] for n, _ in REWARDS}
        with torch.no_grad():
            for i in range(0, len(ids), 400):
                seqs = model.generate(input_ids=ids[i:i + 400], attention_mask=attn[i:i + 400], do_sample=True,
                                      temperature=args.temperature, top_p=1.0, top_k=0,
                                      max_new_tokens=args.max_completion, eos_token_id=eos, pad_token_id=pad)
                for j, c in enumerate(seqs[:, ids.shape[1]:]):
                    text = args.response_prefix + tok.decode(c, skip_special_tokens=True)
                    ref = records[(i + j) // args.eval_samples]["answer"]
                    for n, fn in REWARDS:
                        scores[n].append(fn(text, ref))
        means = {n: sum(v) / len(v) for n, v in scores.items()}
        fmt = sum(means[n] for n in FORMAT)
        print(f"{name[-60:]:<60} {len(scores['xml_count']):>11}  "
              + "  ".join(f"{means[n]:>13.4f}" for n, _ in REWARDS) + f"  {fmt:.4f}", flush=True)


def read_rows(path):
    rows = {}
    for line in open(path):
        r = json.loads(line)
        if "rewards/xml_count" in r:
            rows[r["step"]] = r  # a resumed run rewrites steps: keep the last
    return [rows[s] for s in sorted(rows)]


def summary(paths, k):
    """Mean format reward (xml_count + soft + strict) over the first and last k steps of each run."""
    print(f"{'run':<52} steps  format: first {k} -> last {k} (change)   xml_count: first -> last   kl last")
    changes = []
    for path in paths:
        rows = read_rows(path)
        if len(rows) < 2:
            continue
        n = min(k, len(rows) // 2)

        def mean(rs, keys):
            return sum(sum(r[key] for key in keys) for r in rs) / len(rs)

        keys = [f"rewards/{f}" for f in FORMAT]
        fa, fb = mean(rows[:n], keys), mean(rows[-n:], keys)
        xa, xb = mean(rows[:n], keys[:1]), mean(rows[-n:], keys[:1])
        changes.append(fb - fa)
        print(f"{path[-52:]:<52} {len(rows):>5}  {fa:+.4f} -> {fb:+.4f} ({fb - fa:+.4f})   "
              f"{xa:+.4f} -> {xb:+.4f}   {rows[-1].get('kl', float('nan')):.2e}")
    if len(changes) > 1:
        m = sum(changes) / len(changes)
        sd = (sum((c - m) ** 2 for c in changes) / (len(changes) - 1)) ** 0.5
        up = sum(c > 0 for c in changes)
        print(f"{len(changes)} runs: change {m:+.4f} +- {sd / len(changes) ** 0.5:.4f} (s.e.), rose in {up}")


if __name__ == "__main__":
    a = parse_args()
    if a.summary:
        summary(a.summary, a.window)
    elif a.evaluate:
        evaluate(a)
    else:
        if not (a.model and a.out):
            sys.exit("--model and --out are required to train (or give --summary FILES)")
        train(a)
