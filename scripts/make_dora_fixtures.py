# Parity fixtures for runner's DoRA (peft `use_dora=True`) on the tiny Qwen2 of make_sft_fixtures.py:
#  - tests/fixtures/sft/sft_dora_grads.safetensors: base weights, adapter values (A, B and a perturbed
#    magnitude), one batch, peft's loss, logits and gradients of A, B and lora_magnitude_vector;
#  - tests/fixtures/train/peft_dora_adapter/: the same adapter as peft's save_pretrained writes it.
# Run: python3 scripts/make_dora_fixtures.py   (CPU; needs torch, transformers, peft)
import os, shutil, torch, transformers as tf, peft
from safetensors.torch import save_file

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
torch.manual_seed(0)
c = tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="eager")
m = tf.Qwen2ForCausalLM(c).float()
with torch.no_grad():
    for n, p in m.named_parameters():
        if n.endswith("bias"):
            p.normal_(0, 0.02)
base = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
m = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=T, use_dora=True))
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    # Magnitudes away from ||W + sBA|| so the DoRA scale is not 1.
    for n, p in m.named_parameters():
        if "lora_magnitude_vector" in n:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
ids = torch.randint(0, 64, (2, 7), generator=g)
lab = ids.clone(); lab[0, :2] = -100; lab[1, 5:] = -100
am = torch.ones_like(ids); am[1, 5:] = 0
o = m(input_ids=ids, attention_mask=am, labels=lab)
o.loss.backward()
d = {"base." + k: v for k, v in base.items()}
for n, p in m.named_parameters():
    if "lora_" in n:
        d["init." + n] = p.detach().clone()
        d["grad." + n] = p.grad.clone()
d.update(loss=o.loss.detach().reshape(1), input_ids=ids, labels=lab, attention_mask=am,
         logits=o.logits.detach().contiguous())
save_file(d, os.path.join(root, "tests/fixtures/sft/sft_dora_grads.safetensors"),
          {"src": "peft " + peft.__version__, "transformers": tf.__version__, "torch": torch.__version__})
out = os.path.join(root, "tests/fixtures/train/peft_dora_adapter")
shutil.rmtree(out, ignore_errors=True)
m.save_pretrained(out)
for f in os.listdir(out):
    if f not in ("adapter_config.json", "adapter_model.safetensors"):
        os.remove(os.path.join(out, f))
print("peft", peft.__version__, "loss", o.loss.item())
