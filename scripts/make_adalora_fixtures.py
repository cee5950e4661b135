# Parity fixtures for runner's AdaLoRA (peft 0.21 tuners/adalora) on the tiny Qwen2 of
# sft_lora_grads.safetensors (its base weights and batch are reused, not stored again).
# Run: OUT=tests/fixtures/sft python3 scripts/make_adalora_fixtures.py
# Writes:
#  adalora_grads.safetensors   one forward/backward: loss (CE + orth reg), grads of A, E, B
#  adalora_budget.safetensors  10 optimizer steps as peft's training loop: per-step loss and
#                              rank pattern (1 kept, 0 masked, -1 none yet), initial and final A/E/B
#  adalora_adapter/            peft's save_pretrained after those steps (rank_pattern, cut tensors)
#  adalora_peft_logits.safetensors  logits of PeftModel.from_pretrained(base, adalora_adapter)
import os, torch, transformers as tf, peft
from safetensors.torch import save_file, load_file

out = os.environ["OUT"]
fx = load_file(os.path.join(out, "sft_lora_grads.safetensors"))
T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ids, lab, am = fx["input_ids"], fx["labels"], fx["attention_mask"]


def base_model():
    c = tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       attn_implementation="eager")
    m = tf.Qwen2ForCausalLM(c).float()
    sd = {k[5:]: v for k, v in fx.items() if k.startswith("base.")}
    m.load_state_dict(sd, strict=False)
    return m


def adalora(**kw):
    cfg = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=T, orth_reg_weight=0.5,
               task_type="CAUSAL_LM", total_step=10, tinit=2, tfinal=3, deltaT=2)
    cfg.update(kw)
    return peft.get_peft_model(base_model(), peft.AdaLoraConfig(**cfg))


def short(n):  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default -> ...lora_A
    return n.replace(".default", "")


meta = {"src": "peft " + peft.__version__, "transformers": tf.__version__, "torch": torch.__version__}

# 1. One step: random A, E, B (peft's init has E = 0, which gives A and B zero gradients).
m = adalora()
g = torch.Generator().manual_seed(5)
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
o = m(input_ids=ids, attention_mask=am, labels=lab)
o.loss.backward()
d = {}
for n, p in m.named_parameters():
    if "lora_" in n:
        d["init." + short(n)] = p.detach().clone()
        d["grad." + short(n)] = p.grad.clone()
ce = torch.nn.functional.cross_entropy(o.logits[:, :-1].reshape(-1, 64), lab[:, 1:].reshape(-1))
d["loss"] = o.loss.detach().reshape(1)
d["loss_ce"] = ce.detach().reshape(1)
save_file(d, os.path.join(out, "adalora_grads.safetensors"), meta)
print("one step: loss", o.loss.item(), "ce", ce.item())

# 2. Ten steps of peft's documented loop: backward, clip, AdamW step, update_and_allocate, zero_grad.
torch.manual_seed(1234)
m = adalora()
names = [n for n, p in m.named_parameters() if "lora_E" in n]
d = {"init." + short(n): p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}
params = [p for p in m.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
losses, patterns = [], []
for step in range(10):
    o = m(input_ids=ids, attention_mask=am, labels=lab)
    o.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    m.base_model.update_and_allocate(step)
    opt.zero_grad()
    losses.append(o.loss.item())
    rp = m.peft_config["default"].rank_pattern
    if rp is None:
        patterns.append([-1] * (4 * len(names)))
    else:
        key = lambda n: n[len("base_model.model."):]
        patterns.append([int(b) for n in names for b in rp[key(n)]])
    print("step", step, "loss", losses[-1], "kept", sum(max(x, 0) for x in patterns[-1]) if rp else None)
for n, p in m.named_parameters():
    if "lora_" in n:
        d["final." + short(n)] = p.detach().clone()
d["losses"] = torch.tensor(losses, dtype=torch.float32)
d["patterns"] = torch.tensor(patterns, dtype=torch.int64)
save_file(d, os.path.join(out, "adalora_budget.safetensors"), meta)

# 3. peft's own save and reload; the reloaded model must give the trained model's logits.
m.eval()
with torch.no_grad():
    want = m(input_ids=ids, attention_mask=am).logits
adir = os.path.join(out, "adalora_adapter")
m.save_pretrained(adir)
os.remove(os.path.join(adir, "README.md"))  # peft's model card, not needed
r = peft.PeftModel.from_pretrained(base_model(), adir)
r.eval()
with torch.no_grad():
    got = r(input_ids=ids, attention_mask=am).logits
print("reload max |diff|", (got - want).abs().max().item())
save_file({"logits": got.contiguous()}, os.path.join(out, "adalora_peft_logits.safetensors"), meta)
