# Parity fixture for runner's SFT LoRA loss and gradients (peft when installed, else the same math by hand).
# Run: OUT=tests/fixtures/sft python3 scripts/make_sft_fixtures.py
import os,torch,torch.nn as nn,transformers as tf
from safetensors.torch import save_file
torch.manual_seed(0)
c=tf.Qwen2Config(vocab_size=64,hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,tie_word_embeddings=True,attn_implementation="eager")
m=tf.Qwen2ForCausalLM(c).float()
with torch.no_grad():
 for n,p in m.named_parameters():
  if n.endswith("bias"):p.normal_(0,0.02)
T=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]
base={k:v.detach().clone().contiguous() for k,v in m.state_dict().items()}
try:
 import peft;m=peft.get_peft_model(m,peft.LoraConfig(r=4,lora_alpha=8,lora_dropout=0.0,target_modules=T));src="peft "+peft.__version__
except ImportError:
 src="manual"
 for n,l in list(m.named_modules()):
  if n.split(".")[-1] in T:
   l.lora_A=nn.Linear(l.in_features,4,bias=False);l.lora_B=nn.Linear(4,l.out_features,bias=False)
   l.forward=lambda x,f=l.forward,l=l:f(x)+l.lora_B(l.lora_A(x))*2.0
g=torch.Generator().manual_seed(1)
with torch.no_grad():
 for n,p in m.named_parameters():
  if "lora_" in n:p.copy_(torch.randn(p.shape,generator=g)*0.1)
ids=torch.randint(0,64,(2,7),generator=g)
lab=ids.clone();lab[0,:2]=-100;lab[1,5:]=-100
am=torch.ones_like(ids);am[1,5:]=0
o=m(input_ids=ids,attention_mask=am,labels=lab)
o.loss.backward()
d={"base."+k:v for k,v in base.items()}
for n,p in m.named_parameters():
 if "lora_" in n:d["init."+n]=p.detach().clone();d["grad."+n]=p.grad.clone()
d.update(loss=o.loss.detach().reshape(1),input_ids=ids,labels=lab,attention_mask=am,logits=o.logits.detach().contiguous())
save_file(d,os.environ["OUT"]+"/sft_lora_grads.safetensors",{"src":src,"transformers":tf.__version__,"torch":torch.__version__})
print(src,tf.__version__,o.loss.item())
