"""PyTorch side of the GPU benchmarks: the same shapes as `bench` (src/backend/bench.rs).

Prints one JSON line per measurement; with `--ours FILE` (the Rust bench's JSON lines) it prints
a side-by-side table with burn/PyTorch ratios instead.
Usage on the GPU machine: scripts/bench.sh (runs both).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

DEV = "cuda"
BF16 = torch.bfloat16


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def record(name, ms, flops, base):
    mem = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"impl": "torch", "name": name, "ms": ms, "tflops": flops / ms / 1e9, "mem_gib": mem}


def start():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def matmul_shapes():
    tokens = 8 * 1024
    shapes = [("gemm_8192", 8192, 8192, 8192, False)]
    for model, hidden, inter, kv in [("0.5b", 896, 4864, 128), ("7b", 3584, 18944, 512)]:
        for proj, k, n in [("q", hidden, hidden), ("kv", hidden, kv), ("o", hidden, hidden),
                           ("gate_up", hidden, inter), ("down", inter, hidden)]:
            shapes.append((f"{model}_{proj}", tokens, k, n, True))
    return shapes


def bench_matmul():
    out = []
    for name, m, k, n, weight_layout in matmul_shapes():
        base = start()
        x = torch.randn(m, k, device=DEV, dtype=BF16)
        if weight_layout:
            w = torch.randn(n, k, device=DEV, dtype=BF16)
            fn = lambda: F.linear(x, w)
        else:
            w = torch.randn(k, n, device=DEV, dtype=BF16)
            fn = lambda: x @ w
        iters = 20 if m * k * n > 100_000_000_000 else 50
        out.append(record(name, timed(fn, 3, iters), 2.0 * m * k * n, base))
        del x, w
    return out


def bench_attention():
    out = []
    for batch, seq in [(8, 1024), (2, 4096)]:
        hq, hkv, d = 14, 2, 64
        base = start()
        q = torch.randn(batch, hq, seq, d, device=DEV, dtype=BF16, requires_grad=True)
        k = torch.randn(batch, hkv, seq, d, device=DEV, dtype=BF16, requires_grad=True)
        v = torch.randn(batch, hkv, seq, d, device=DEV, dtype=BF16, requires_grad=True)

        def step():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o.float().sum().backward()

        fwd = 4.0 * batch * hq * seq * seq * d / 2.0
        out.append(record(f"attn_fwd_bwd_b{batch}_s{seq}", timed(step, 2, 10), 3.5 * fwd, base))
        with torch.no_grad():
            def forward():
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum()
            out.append(record(f"attn_fwd_b{batch}_s{seq}", timed(forward, 2, 10), fwd, base))
        del q, k, v
    return out


def bench_ce():
    n, d, v = 8192, 896, 151936
    base = start()
    h = torch.randn(n, d, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.randn(v, d, device=DEV, dtype=BF16) * 0.02
    labels = (torch.arange(n, device=DEV) * 7919) % v

    def step():
        # What HF transformers does: full logits, upcast, cross-entropy.
        logits = F.linear(h, w).float()
        F.cross_entropy(logits, labels, ignore_index=-100).backward()

    return [record("ce_fwd_bwd_0.5b_8192tok", timed(step, 2, 10), 6.0 * n * d * v, base)]


def table(ours, theirs):
    print(f"{'case':28} {'burn ms':>9} {'torch ms':>9} {'burn TF/s':>10} {'torch TF/s':>10} "
          f"{'ratio':>6} {'burn GiB':>9} {'torch GiB':>9}")
    for name, t in theirs.items():
        o = ours.get(name)
        if o is None:
            print(f"{name:28} {'-':>9} {t['ms']:9.3f} {'-':>10} {t['tflops']:10.1f}")
            continue
        print(f"{name:28} {o['ms']:9.3f} {t['ms']:9.3f} {o['tflops']:10.1f} {t['tflops']:10.1f} "
              f"{t['ms'] / o['ms']:6.2f} {o['mem_gib']:9.2f} {t['mem_gib']:9.2f}")
    for name, o in ours.items():
        if name not in theirs:
            print(f"{name:28} {o['ms']:9.3f} {'-':>9} {o['tflops']:10.1f}")
    print("ratio = torch ms / burn ms (>1: burn faster). burn GiB: cuMemGetInfo growth during the case "
          "(cubecl pool, reserved); torch GiB: peak allocated.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["matmul", "attention", "ce", "all"])
    ap.add_argument("--ours", help="JSON lines from the Rust bench, to print a joint table")
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"cudnn {torch.backends.cudnn.version()}", flush=True)
    results = []
    if args.what in ("matmul", "all"):
        results += bench_matmul()
    if args.what in ("ce", "all"):
        results += bench_ce()
    if args.what in ("attention", "all"):
        results += bench_attention()
    if args.ours:
        ours = {}
        with open(args.ours) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    ours[r["name"]] = r
        table(ours, {r["name"]: r for r in results})
    else:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
