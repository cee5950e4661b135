"""peft LoRA loss and gradients on the Gemma 2 family fixture (the family that differs most from
Llama: soft-capping, GeGLU, (1 + w) norms, norms after attention and MLP, sliding layers).

Writes tests/fixtures/sft/gemma2_lora_grads.safetensors: init.<peft name> (the LoRA factors),
grad.<peft name>, loss, input_ids, labels. Run: python scripts/make_family_lora_fixture.py
"""
import torch
import peft
import transformers as tf
from safetensors.torch import save_file

SRC = "tests/fixtures/families/gemma2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

m = tf.AutoModelForCausalLM.from_pretrained(SRC, attn_implementation="eager").float()
m = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
# 12 tokens: longer than the sliding window (8). Row 1 is right-padded after 9 tokens.
ids = torch.randint(3, m.config.vocab_size, (2, 12), generator=g)
labels = ids.clone()
labels[0, :3] = -100
labels[1, 9:] = -100
mask = torch.ones_like(ids)
mask[1, 9:] = 0
out = m(input_ids=ids, attention_mask=mask, labels=labels)
out.loss.backward()
d = {}
for n, p in m.named_parameters():
    if "lora_" in n:
        d["init." + n] = p.detach().clone().contiguous()
        d["grad." + n] = p.grad.clone().contiguous()
d.update(loss=out.loss.detach().reshape(1), input_ids=ids, labels=labels)
save_file(d, "tests/fixtures/sft/gemma2_lora_grads.safetensors",
          {"peft": peft.__version__, "transformers": tf.__version__, "torch": torch.__version__})
print("peft", peft.__version__, "loss", out.loss.item())
