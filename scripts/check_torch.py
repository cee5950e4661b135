"""Recomputes with PyTorch autograd the tensors that `bench check` dumped (src/backend/check.rs)
and compares: linear (cuBLASLt matmul) outputs and gradients, chunked cross-entropy loss and
gradients, causal GQA attention outputs and gradients, in f32 and bf16; the fused (flash)
attention kernels in bf16 against f32 eager attention with padding and key offsets.

Usage on the GPU machine: BIN check --dump-dir D && python3 scripts/check_torch.py D
Error metric: max |burn - torch| / max |torch|. Limits: f32 1e-4 (attention 2e-4, softmax in
f32 but different summation order), bf16 2e-2 (inputs identical; outputs rounded to bf16 once
on each side, gradients accumulate in different orders).
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LIMIT = {"f32": 1e-4, "bf16": 2e-2}


def load(d):
    tensors = {}
    for line in (d / "manifest.txt").read_text().splitlines():
        name, *dims = line.split()
        data = np.fromfile(d / f"{name}.bin", dtype="<f4").reshape([int(x) for x in dims])
        tensors[name] = torch.from_numpy(data).cuda()
    return tensors


def rel(got, want):
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def main():
    t = load(Path(sys.argv[1]))
    ok = True

    def report(name, got, want, limit):
        nonlocal ok
        err = rel(got, want)
        passed = err <= limit
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {name}: rel err {err:.2e} (limit {limit:.0e})")

    for tag, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        lim = LIMIT[tag]
        p = lambda n: t[n].to(dtype).detach().requires_grad_(True)

        x, w = p(f"linear_{tag}_x"), p(f"linear_{tag}_w")
        y = F.linear(x, w)
        (y.float() * t[f"linear_{tag}_g"].to(dtype).float()).sum().backward()
        report(f"linear {tag} y", t[f"linear_{tag}_y"], y, lim)
        report(f"linear {tag} dx", t[f"linear_{tag}_dx"], x.grad, lim)
        report(f"linear {tag} dw", t[f"linear_{tag}_dw"], w.grad, lim)

        h, wh = p(f"ce_{tag}_h"), p(f"ce_{tag}_w")
        labels = t[f"ce_{tag}_labels"].long()
        loss = F.cross_entropy(F.linear(h, wh).float(), labels, ignore_index=-100)
        loss.backward()
        report(f"ce {tag} loss", t[f"ce_{tag}_loss"].reshape(()), loss, lim)
        report(f"ce {tag} dh", t[f"ce_{tag}_dh"], h.grad, lim)
        report(f"ce {tag} dw", t[f"ce_{tag}_dw"], wh.grad, lim)

        q, k, v = p(f"attn_{tag}_q"), p(f"attn_{tag}_k"), p(f"attn_{tag}_v")
        if tag == "f32":
            torch.backends.cuda.matmul.allow_tf32 = False
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        (o.float() * t[f"attn_{tag}_go"].to(dtype).float()).sum().backward()
        alim = 2e-4 if tag == "f32" else lim
        report(f"attn {tag} o", t[f"attn_{tag}_o"], o, alim)
        report(f"attn {tag} dq", t[f"attn_{tag}_dq"], q.grad, alim)
        report(f"attn {tag} dk", t[f"attn_{tag}_dk"], k.grad, alim)
        report(f"attn {tag} dv", t[f"attn_{tag}_dv"], v.grad, alim)
    # Fused attention (bf16 flash kernels): [b, t, h, d] outputs; causal with the queries at the
    # end of the keys; `valid` [b, s] masks padding keys. Rows that see no key must be 0.
    torch.backends.cuda.matmul.allow_tf32 = False
    for case in sorted({n[len("flash_"):-len("_q")] for n in t if n.startswith("flash_") and n.endswith("_q")}):
        g = lambda n: t[f"flash_{case}_{n}"]
        q, k, v = (g(n).to(torch.bfloat16).float().detach().requires_grad_(True) for n in "qkv")
        b, h, tq, d = q.shape
        kvh, s = k.shape[1], k.shape[2]
        rep = h // kvh
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ kk.transpose(-1, -2) / d ** 0.5
        pos = torch.arange(tq, device=q.device)[:, None] + (s - tq)
        hidden = torch.arange(s, device=q.device)[None, :] > pos
        hidden = hidden[None, None] | (g("valid") == 0)[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(hidden, -1e30), -1)
        probs = probs.masked_fill(hidden.all(-1, keepdim=True), 0.0)
        o = (probs @ vv).transpose(1, 2)
        (o * g("go").to(torch.bfloat16).float()).sum().backward()
        report(f"flash {case} o", g("o"), o, 2e-2)
        report(f"flash {case} dq", g("dq"), q.grad, 2e-2)
        report(f"flash {case} dk", g("dk"), k.grad, 2e-2)
        report(f"flash {case} dv", g("dv"), v.grad, 2e-2)
    print("ALL PASS" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
