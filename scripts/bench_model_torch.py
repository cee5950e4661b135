#!/usr/bin/env python3
"""transformers side of `runner bench decode` (random Qwen2.5-shaped model, bf16, SDPA, KV
cache, greedy with the argmax kept on the GPU), and the side-by-side table of runner's model
benchmarks against transformers/peft (`table`).

Usage on the GPU machine (scripts/bench-gpu.sh runs everything):
  python3 scripts/bench_model_torch.py decode --shape 0.5b --batch 1 --seq 128 --steps 64
  python3 scripts/bench_model_torch.py table --ours runner.jsonl --theirs torch.jsonl
"""
import argparse
import json
import time

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def decode(a):
    import torch
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**SHAPES[a.shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")

    @torch.no_grad()
    def run():
        cache = DynamicCache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(a.steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run()
    torch.cuda.reset_peak_memory_stats()
    prefill, dec = run()
    print(json.dumps({"impl": "transformers", "what": "decode", "shape": a.shape, "batch": a.batch, "seq": a.seq,
                      "dtype": "bf16", "prefill_tokens_per_s": a.batch * a.seq / prefill,
                      "decode_tokens_per_s": a.batch * a.steps / dec,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "torch": torch.__version__}), flush=True)


def table(a):
    ours = [json.loads(l) for l in open(a.ours) if l.strip().startswith("{")]
    theirs = [json.loads(l) for l in open(a.theirs) if l.strip().startswith("{")]
    print("\ncase                                   runner            torch/peft        ratio  runner GiB  torch GiB")
    for o in ours:
        if o.get("what") == "decode":
            t = next((t for t in theirs if t.get("what") == "decode" and t["batch"] == o["batch"]), None)
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                tv = t[key] if t else float("nan")
                print(f"{key[:-14]} b{o['batch']} {o['dtype']:<5} 0.5b".ljust(38),
                      f"{o[key]:>12.0f} tok/s {tv:>12.0f} tok/s {o[key] / tv:>6.2f}"
                      f" {o.get('gpu_reserved_gib', 0):>10.2f} {t['peak_gib'] if t else float('nan'):>10.2f}")
        elif o.get("what") == "sft":
            # runner writes false / true / offload (older builds: a bool).
            gc = 0 if str(o["gradient_checkpointing"]).lower() in ("false", "0") else 1
            t = next((t for t in theirs if "tokens_per_s" in t and t.get("gc") == gc and t.get("size") == o["shape"]), None)
            tv = t["tokens_per_s"] if t else float("nan")
            print(f"lora sft {o['shape']} b{o['batch']}x{o['seq']} gc{gc} {o['dtype']}".ljust(38),
                  f"{o['tokens_per_s']:>12.0f} tok/s {tv:>12.0f} tok/s {o['tokens_per_s'] / tv:>6.2f}"
                  f" {o.get('gpu_reserved_gib', 0):>10.2f} {t['peak_gib'] if t else float('nan'):>10.2f}")
    print("ratio = runner / torch (>1: runner faster). runner GiB: growth of cuMemGetInfo's used memory"
          " (cubecl pools: reserved); torch GiB: max_memory_allocated.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["decode", "table"])
    ap.add_argument("--shape", default="0.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--ours")
    ap.add_argument("--theirs")
    a = ap.parse_args()
    decode(a) if a.what == "decode" else table(a)


if __name__ == "__main__":
    main()
