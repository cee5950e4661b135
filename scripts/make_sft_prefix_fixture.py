# Parity fixture for runner's P-Tuning v2 (peft PREFIX_TUNING) loss and prefix gradient on the same tiny Qwen2.
# Run: OUT=tests/fixtures/sft python3 scripts/make_sft_prefix_fixture.py
import os,json,torch,transformers as tf,peft
from safetensors.torch import save_file
torch.manual_seed(0)
c=tf.Qwen2Config(vocab_size=64,hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,tie_word_embeddings=True,attn_implementation="eager")
m=tf.Qwen2ForCausalLM(c).float()
with torch.no_grad():
 for n,p in m.named_parameters():
  if n.endswith("bias"):p.normal_(0,0.02)
base={k:v.detach().clone().contiguous() for k,v in m.state_dict().items()}
m=peft.get_peft_model(m,peft.PrefixTuningConfig(task_type="CAUSAL_LM",num_virtual_tokens=3))
e=m.prompt_encoder["default"].embedding.weight
g=torch.Generator().manual_seed(2)
with torch.no_grad():e.copy_(torch.randn(e.shape,generator=g)*0.5)
ids=torch.randint(0,64,(2,7),generator=g)
lab=ids.clone();lab[0,:2]=-100;lab[1,5:]=-100
am=torch.ones_like(ids);am[1,5:]=0
o=m(input_ids=ids,attention_mask=am,labels=lab)
o.loss.backward()
d={"base."+k:v for k,v in base.items()}
d.update(prompt_embeddings=e.detach().clone(),grad=e.grad.clone(),loss=o.loss.detach().reshape(1),input_ids=ids,labels=lab)
pc=m.peft_config["default"]
save_file(d,os.environ["OUT"]+"/sft_prefix_grads.safetensors",{"peft":peft.__version__,"transformers":tf.__version__,"config":json.dumps({"token_dim":pc.token_dim,"num_attention_heads":pc.num_attention_heads,"num_layers":pc.num_layers})})
print(o.loss.item(),pc.token_dim,pc.num_attention_heads,e.shape)
