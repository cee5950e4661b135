"""Build tiny random Qwen2 and Llama checkpoints plus transformers reference outputs.

Writes into $OUT (default tests/fixtures/model), one folder per model:
  config.json, model.safetensors (f32, save_pretrained), expected.json with
  - ids [2,T] (row 1 left-padded with pad id 0), mask [2,T], positions [2,T]
    (HF generate's rule: cumsum(mask)-1, pads set to 1), logits [2,T,V] f32
  - unpadded_logits: row 1 run alone without padding
  - greedy: [{prompt, tokens (16), min_margin}] by full-recompute argmax
  - reload_max_diff: logits diff after rewriting config.json as runner's to_hf_json writes it
Run with transformers 5.x (the device machine's 5.17) on CPU in f32.
"""
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = os.environ.get("OUT", "tests/fixtures/model")
# ONLY=name builds one model (qwen2_d64, head dim 64, is for the GPU's fused attention: too large
# to commit, scripts/gpu_parity.py builds it on the device).
ONLY = os.environ.get("ONLY")
torch.set_grad_enabled(False)


def perturb(m):
    # Default init (std 0.02, zero bias, unit norm) gives near-flat logits; widen it so
    # greedy choices have margins and biases/norms matter.
    for n, p in m.named_parameters():
        if "norm" in n:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif n.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.normal_(0, 0.08)


def logits(m, ids, mask=None, pos=None):
    return m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


def build(name, cls, cfg, ours):
    if ONLY and name != ONLY or not ONLY and name == "qwen2_d64":
        return
    torch.manual_seed(1234)
    m = cls(cfg).float().eval()
    perturb(m)
    d = os.path.join(OUT, name)
    m.save_pretrained(d)
    gen = os.path.join(d, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    V, T, P = cfg.vocab_size, 10, 3
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    ids[1, :P] = 0
    mask[1, :P] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    lg = logits(m, ids, mask, pos)
    alone = logits(m, ids[1:, P:])
    pad_diff = (lg[1, P:] - alone[0]).abs().max().item()
    greedy = []
    for plen in (1, 5, 9):
        seq = ids[0, :plen].tolist()
        toks, margin = [], 1e9
        for _ in range(16):
            last = logits(m, torch.tensor([seq]))[0, -1]
            top = last.topk(2).values
            margin = min(margin, (top[0] - top[1]).item())
            t = int(last.argmax())
            toks.append(t)
            seq.append(t)
        greedy.append({"prompt": ids[0, :plen].tolist(), "tokens": toks, "min_margin": margin})
    # Reload through the config.json runner writes (legacy keys transformers 5 converts).
    base = {k: getattr(cfg, k) for k in ours}
    base.update(architectures=[cls.__name__], model_type=cfg.model_type, torch_dtype="float32",
                hidden_act="silu", rope_theta=float(cfg.rope_parameters["rope_theta"]))
    rp = {k: v for k, v in cfg.rope_parameters.items() if k != "rope_theta"}
    base["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    with open(os.path.join(d, "config.json")) as f:
        hf_written = f.read()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(base, f)
    try:
        m2 = cls.from_pretrained(d).float().eval()
        reload_diff = (logits(m2, ids, mask, pos) - lg).abs().max().item()
    except Exception as e:  # recorded, so one run still yields the fixtures
        reload_diff = repr(e)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(hf_written)
    exp = dict(ids=ids.tolist(), mask=mask.tolist(), positions=pos.tolist(), logits=lg.tolist(),
               unpadded_logits=alone[0].tolist(), greedy=greedy, pad_max_diff=pad_diff,
               reload_max_diff=reload_diff)
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(exp, f)
    print(name, pad_diff, reload_diff, [x["min_margin"] for x in greedy], os.listdir(d))


common = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
          "bos_token_id", "eos_token_id", "initializer_range"]
q = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
build("qwen2", Qwen2ForCausalLM, q, common)
rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
l = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                rope_parameters=rope)
build("llama", LlamaForCausalLM, l, common + ["head_dim", "attention_bias", "mlp_bias"])
q64 = Qwen2Config(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
build("qwen2_d64", Qwen2ForCausalLM, q64, common)
