# Parity fixtures for runner's prompt tuning and P-Tuning (MLP, LSTM) loss and gradients, and for
# peft-written prompt-learning adapters (prompt tuning, P-Tuning LSTM, prefix tuning) loaded for
# inference (init std 0.3, so that the prompts change the greedy tokens): logits and greedy generations of peft 0.21 on the tiny Qwen2 of make_sft_prefix_fixture.py.
# Run: OUT=tests/fixtures/sft python3 scripts/make_sft_prompt_fixture.py
import copy, json, os, tempfile, torch, transformers as tf, peft
from safetensors.torch import save_file

out = os.environ["OUT"]
torch.manual_seed(0)
c = tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="eager",
                   initializer_range=0.3)
base_model = tf.Qwen2ForCausalLM(c).float()
with torch.no_grad():
    for n, p in base_model.named_parameters():
        if n.endswith("bias"):
            p.normal_(0, 0.02)
base = {k: v.detach().clone().contiguous() for k, v in base_model.state_dict().items()}
g = torch.Generator().manual_seed(2)
ids = torch.randint(0, 64, (2, 7), generator=g)
# Label 0 is -100 in both rows: peft scores it from the last virtual token, runner does not.
lab = ids.clone(); lab[0, :2] = -100; lab[1, 0] = -100; lab[1, 5:] = -100
am = torch.ones_like(ids); am[1, 5:] = 0
d = {"base." + k: v for k, v in base.items()}
d.update(input_ids=ids, labels=lab)

# 1. One training step: loss and gradients of every prompt-encoder parameter.
train_cases = [
    ("pt", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    ("mlp", peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8)),
    ("lstm", peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8,
                                      encoder_reparameterization_type="LSTM", encoder_num_layers=2)),
]
for k, (name, cfg) in enumerate(train_cases):
    torch.manual_seed(10 + k)
    m = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    enc = m.prompt_encoder["default"]
    if name == "pt":
        with torch.no_grad():
            enc.embedding.weight.copy_(torch.randn(enc.embedding.weight.shape, generator=g) * 0.5)
    o = m(input_ids=ids, attention_mask=am, labels=lab)
    o.loss.backward()
    for pn, p in enc.named_parameters():
        d[f"{name}.param.{pn}"] = p.detach().clone().contiguous()
        d[f"{name}.grad.{pn}"] = p.grad.clone().contiguous()
    d[f"{name}.loss"] = o.loss.detach().reshape(1)
    d[f"{name}.prompt_embeddings"] = m.get_prompt_embedding_to_save("default").detach().clone()
    print(name, o.loss.item())

# 2. peft-written adapters loaded by peft for inference: logits of the real tokens and greedy tokens.
infer_ids = torch.randint(0, 64, (2, 5), generator=g)
d["infer_ids"] = infer_ids
infer_cases = [
    ("pt", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    ("lstm", peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8,
                                      encoder_reparameterization_type="LSTM", encoder_num_layers=2)),
    ("prefix", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
]
configs = {}
for k, (name, cfg) in enumerate(infer_cases):
    torch.manual_seed(20 + k)
    m = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    with torch.no_grad():
        w = m.prompt_encoder["default"].embedding.weight
        # Prefix keys/values need a larger scale than virtual tokens to move the greedy tokens.
        w.copy_(torch.randn(w.shape, generator=g) * (3.0 if name == "prefix" else 0.5))
    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        configs[name] = json.load(open(os.path.join(tmp, "adapter_config.json")))
        from safetensors.torch import load_file
        d[f"saved.{name}.prompt_embeddings"] = load_file(os.path.join(tmp, "adapter_model.safetensors"))["prompt_embeddings"]
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp).eval()
    with torch.no_grad():
        logits = loaded(input_ids=infer_ids, attention_mask=torch.ones_like(infer_ids)).logits
        if name != "prefix":
            logits = logits[:, 3:]
        # Greedy decoding by full forwards: with transformers 5.24, peft 0.21's generate() drops the
        # prefix-tuning cache (it yields the base model's tokens), so forward() is the reference.
        gen = infer_ids
        for _ in range(4):
            last = loaded(input_ids=gen, attention_mask=torch.ones_like(gen)).logits[:, -1]
            gen = torch.cat([gen, last.argmax(-1, keepdim=True)], 1)
        plain = base_model.generate(input_ids=infer_ids, attention_mask=torch.ones_like(infer_ids), max_new_tokens=4,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
    d[f"saved.{name}.logits"] = logits.contiguous()
    d[f"saved.{name}.generated"] = gen[:, -4:].contiguous()
    print(name, "generated", gen[:, -4:].tolist(), "without the adapter", plain[:, -4:].tolist())

meta = {"peft": peft.__version__, "transformers": tf.__version__, "adapter_configs": json.dumps(configs)}
save_file(d, os.path.join(out, "sft_prompt_grads.safetensors"), meta)
