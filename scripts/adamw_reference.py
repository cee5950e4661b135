# torch reference for train::optim's test `three_clipped_steps_match_torch_adamw` (torch 2.11, CPU).
import torch
w=torch.nn.Parameter(torch.cos(torch.arange(6.)).reshape(2,3));b=torch.nn.Parameter(torch.cos(torch.arange(3.)+1))
o=torch.optim.AdamW([{"params":[w],"weight_decay":0.1},{"params":[b],"weight_decay":0.0}],lr=0.1,betas=(0.9,0.95),eps=1e-6)
for k in range(3):
  w.grad=torch.sin(torch.arange(6.)*(k+1)).reshape(2,3)*(k+1);b.grad=torch.sin(torch.arange(3.)+k)*0.5
  n=torch.nn.utils.clip_grad_norm_([w,b],1.5);print("norm",repr(n.item()))
  o.step()
print("w",[repr(x) for x in w.detach().flatten().tolist()]);print("b",[repr(x) for x in b.detach().flatten().tolist()])
