"""Adapters between runner and peft, both ways, for every PEFT method runner trains.

usage:
  # runner -> peft: peft loads runner's adapter and must give runner's logits
  python3 scripts/peft_roundtrip.py load --base HF_DIR --adapter DIR --logits RUNNER.jsonl [--tol 1e-3] [--exact]
  (--exact: also run peft in float64 throughout, HF's float32 casts in RMSNorm and rotary
  embeddings patched out, and report how far runner's and peft's float32 logits are from it)

  # peft -> runner: peft writes an adapter (non-trivial weights) and its logits for some prompts
  python3 scripts/peft_roundtrip.py make --base HF_DIR --method METHOD --out DIR --ids-from RUNNER.jsonl [--exact]
  (the prompt ids of a `runner generate --logits` file; peft's logits go to DIR/peft_logits.jsonl)

  # the base alone: transformers must give the logits runner wrote without an adapter
  python3 scripts/peft_roundtrip.py base --base HF_DIR --logits RUNNER.jsonl [--tol 1e-3]

  # compares two logits files (e.g. peft's from `make` and runner's from
  # `runner generate --model HF_DIR --adapter DIR --logits FILE` on the same prompts)
  python3 scripts/peft_roundtrip.py compare WANT.jsonl GOT.jsonl [--tol 1e-3] [--exact REF.jsonl]

METHOD: lora, dora, adalora, prompt_tuning, p_tuning (MLP), p_tuning_lstm, prefix.
Logits files hold one JSON object per prompt: prompt_ids, vocab, logits (row-major [len, vocab], the
prompt's own positions: peft's logits at virtual-token positions are dropped), as
`runner generate --logits` writes them. Runs on CPU or GPU in float32; exit status 1 when a
difference exceeds --tol.
"""

import argparse
import json
import sys

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_logits(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load_base(base):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return model.eval()


def prompt_logits(model, ids):
    """Logits of the prompt's own positions, `[len, vocab]` (virtual-token positions dropped)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    return out[-len(ids):].float()


def report(name, diffs, tol, note=""):
    worst = max(diffs)
    status = "ok" if worst <= tol else "FAIL"
    print(f"{name}: max|logit diff| {worst:.3e} over {len(diffs)} prompt(s) (tol {tol:g}) {status}{note}")
    return worst <= tol


def float64_throughout():
    """Patches HF's Llama/Qwen2 RMSNorm and default rotary embedding, which compute in float32
    whatever the model's dtype, to keep float64: the exact reference `load --exact` uses."""
    import importlib

    def rms_forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    def rotary_forward(self, x, position_ids):
        cfg = self.config
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids.double()[..., None] * inv[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = getattr(self, "attention_scaling", 1.0)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    for name, prefix in [("llama", "Llama"), ("qwen2", "Qwen2")]:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        getattr(module, f"{prefix}RMSNorm").forward = rms_forward
        getattr(module, f"{prefix}RotaryEmbedding").forward = rotary_forward


def exact_logits(base_dir, adapter_dir, id_lists):
    """peft in float64 throughout (see float64_throughout): the reference logits per prompt."""
    import peft
    import transformers as tf

    float64_throughout()
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval().to(torch.float64)
    out = []
    with torch.no_grad():
        for ids in id_lists:
            out.append(model(input_ids=torch.tensor([ids])).logits[0][-len(ids):])
    return out


def exact_note(refs, sides):
    """`(float64 reference: NAME off by X, ...)` for `{name: logits tensors per prompt}`."""
    parts = []
    for name, tensors in sides.items():
        worst = max((t.double() - r).abs().max().item() for t, r in zip(tensors, refs))
        parts.append(f"{name} off by {worst:.1e}")
    return " (float64 reference: " + ", ".join(parts) + ")"


def as_tensor(row):
    return torch.tensor(row["logits"], dtype=torch.float64).reshape(len(row["prompt_ids"]), row["vocab"])


def cmd_load(args):
    import peft

    model = peft.PeftModel.from_pretrained(load_base(args.base), args.adapter).eval()
    config = model.peft_config["default"]
    print(f"peft {peft.__version__} loaded {args.adapter}: {config.peft_type.value}")
    rows = read_logits(args.logits)
    diffs, peft32 = [], []
    for row in rows:
        want = torch.tensor(row["logits"]).reshape(len(row["prompt_ids"]), row["vocab"])
        got = prompt_logits(model, row["prompt_ids"])
        peft32.append(got)
        diffs.append((got - want).abs().max().item())
    note = ""
    if args.exact:
        refs = exact_logits(args.base, args.adapter, [r["prompt_ids"] for r in rows])
        note = exact_note(refs, {"runner": [as_tensor(r) for r in rows], "peft float32": peft32})
    return report(f"peft({args.adapter}) vs runner", diffs, args.tol, note)


def peft_config(method, model_config):
    import peft

    causal = peft.TaskType.CAUSAL_LM
    if method in ("lora", "dora"):
        # init_lora_weights=False: B random too, so the adapter changes the logits.
        return peft.LoraConfig(task_type=causal, r=8, lora_alpha=16, target_modules=TARGETS,
                               init_lora_weights=False, use_dora=method == "dora")
    if method == "adalora":
        return peft.AdaLoraConfig(task_type=causal, init_r=6, target_r=4, lora_alpha=8,
                                  target_modules=TARGETS, total_step=100, tinit=10, tfinal=20)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=causal, num_virtual_tokens=8)
    if method in ("p_tuning", "p_tuning_lstm"):
        kind = "LSTM" if method == "p_tuning_lstm" else "MLP"
        return peft.PromptEncoderConfig(task_type=causal, num_virtual_tokens=8, encoder_hidden_size=64,
                                        encoder_reparameterization_type=kind)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=causal, num_virtual_tokens=8)
    raise SystemExit(f"unknown method {method!r}")


def cmd_make(args):
    import peft

    torch.manual_seed(args.seed)
    base = load_base(args.base)
    model = peft.get_peft_model(base, peft_config(args.method, base.config))
    if args.method == "adalora":
        # peft starts E at zero (the adapter is a no-op); give every factor values, and prune a
        # few singular values the way the budget schedule does, so the saved rank pattern varies.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_E" in name or "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.05)
        ranks = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
                e = module.lora_E["default"]
                keep = torch.ones(e.shape[0], dtype=torch.bool)
                keep[: (len(ranks) % 3)] = False
                with torch.no_grad():
                    e.masked_fill_(~keep.view(-1, 1), 0.0)
                ranks[name + ".lora_E"] = keep.tolist()
        model.peft_config["default"].rank_pattern = {
            k.replace("base_model.model.", ""): v for k, v in ranks.items()
        }
    model.eval()
    model.save_pretrained(args.out)
    rows = []
    for ids in [row["prompt_ids"] for row in read_logits(args.ids_from)]:
        logits = prompt_logits(model, ids)
        rows.append({"prompt_ids": ids, "vocab": logits.shape[1], "logits": logits.flatten().tolist()})
    with open(f"{args.out}/peft_logits.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if args.exact:
        refs = exact_logits(args.base, args.out, [row["prompt_ids"] for row in rows])
        with open(f"{args.out}/peft_logits_f64.jsonl", "w") as f:
            for row, ref in zip(rows, refs):
                f.write(json.dumps({**row, "logits": ref.flatten().tolist()}) + "\n")
    print(f"peft {peft.__version__}: wrote {args.method} adapter and logits of {len(rows)} prompt(s) to {args.out}")
    return True


def cmd_base(args):
    model = load_base(args.base)
    diffs = []
    for row in read_logits(args.logits):
        want = torch.tensor(row["logits"]).reshape(len(row["prompt_ids"]), row["vocab"])
        diffs.append((prompt_logits(model, row["prompt_ids"]) - want).abs().max().item())
    return report(f"transformers({args.base}) vs runner", diffs, args.tol)


def cmd_compare(args):
    want, got = read_logits(args.want), read_logits(args.got)
    if len(want) != len(got):
        raise SystemExit(f"{args.want} has {len(want)} prompts, {args.got} has {len(got)}")
    diffs = []
    for w, g in zip(want, got):
        if w["prompt_ids"] != g["prompt_ids"]:
            raise SystemExit(f"prompt ids differ: {w['prompt_ids']} vs {g['prompt_ids']}")
        diffs.append((torch.tensor(w["logits"]) - torch.tensor(g["logits"])).abs().max().item())
    note = ""
    if args.exact:
        refs = [as_tensor(r) for r in read_logits(args.exact)]
        import os

        note = exact_note(refs, {
            os.path.basename(args.want): [as_tensor(r) for r in want],
            os.path.basename(args.got): [as_tensor(r) for r in got],
        })
    return report(f"{args.got} vs {args.want}", diffs, args.tol, note)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load")
    load.add_argument("--base", required=True)
    load.add_argument("--adapter", required=True)
    load.add_argument("--logits", required=True)
    load.add_argument("--tol", type=float, default=1e-3)
    load.add_argument("--exact", action="store_true")
    make = sub.add_parser("make")
    make.add_argument("--base", required=True)
    make.add_argument("--method", required=True)
    make.add_argument("--out", required=True)
    make.add_argument("--ids-from", required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--exact", action="store_true", help="also write DIR/peft_logits_f64.jsonl (float64 peft)")
    base = sub.add_parser("base")
    base.add_argument("--base", required=True)
    base.add_argument("--logits", required=True)
    base.add_argument("--tol", type=float, default=1e-3)
    compare = sub.add_parser("compare")
    compare.add_argument("want")
    compare.add_argument("got")
    compare.add_argument("--tol", type=float, default=1e-3)
    compare.add_argument("--exact", help="float64 reference logits (from make --exact) to measure both files against")
    args = parser.parse_args()
    ok = {"load": cmd_load, "make": cmd_make, "base": cmd_base, "compare": cmd_compare}[args.cmd](args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
