"""Tokens/s and peak GPU memory of each PEFT method in PyTorch + transformers + peft, on a random
Qwen2.5-shaped model, in the configuration `runner bench sft --method M` uses (the LoRA numbers
are ../shared/bench/peft_baseline.py's setup: r=16, alpha=16, the seven projections, AdamW lr 2e-4,
bf16 weights, SDPA attention).

usage: python3 scripts/bench_peft_methods.py [--shape 0.5b] [--batch 8] [--seq 1024]
         [--methods lora,dora,adalora,prompt_tuning,p_tuning,prefix] [--gc 0|1] [--steps 5]
Prints one JSON line per method.
"""

import argparse
import json
import time

import torch

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VIRTUAL = 20  # virtual tokens of prompt tuning, P-Tuning and prefix tuning (runner bench's value)


def config(method, total_steps):
    import peft

    causal = peft.TaskType.CAUSAL_LM
    if method in ("lora", "dora"):
        return peft.LoraConfig(task_type=causal, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                               use_dora=method == "dora")
    if method == "adalora":
        return peft.AdaLoraConfig(task_type=causal, init_r=16, target_r=8, lora_alpha=16, target_modules=TARGETS,
                                  total_step=total_steps, tinit=0, tfinal=0, deltaT=1)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=causal, num_virtual_tokens=VIRTUAL)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(task_type=causal, num_virtual_tokens=VIRTUAL)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=causal, num_virtual_tokens=VIRTUAL)
    raise SystemExit(f"unknown method {method!r}")


def run(method, shape, batch, seq, gc, steps, warm=2):
    import peft
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, config(method, steps + warm))
    model.to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    global_step = 0

    def step():
        nonlocal global_step
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(global_step)
        opt.zero_grad(set_to_none=True)
        global_step += 1
        return out.loss

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.time() - t) / steps
    return dict(method=method, shape=shape, batch=batch, seq=seq, gc=gc, tokens_per_s=round(batch * seq / dt),
                step_ms=round(dt * 1e3, 1), peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                trainable_params=sum(p.numel() for p in trainable), loss=float(loss))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gc", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default="lora,dora,adalora,prompt_tuning,p_tuning,prefix")
    a = ap.parse_args()
    for method in a.methods.split(","):
        try:
            print(json.dumps(run(method, a.shape, a.batch, a.seq, a.gc, a.steps)), flush=True)
        except torch.OutOfMemoryError as e:
            print(json.dumps(dict(method=method, shape=a.shape, error=f"out of memory: {e}"[:200])), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
