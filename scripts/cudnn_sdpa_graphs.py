#!/usr/bin/env python3
"""Prints the cuDNN operation graphs PyTorch's SDPA runs (forward and backward), as cuDNN's API
log records them: where the graphs of src/backend/cuda/cudnn_attention.rs come from.

On the GPU machine (PyTorch with cuDNN attention):
  python3 scripts/cudnn_sdpa_graphs.py [--batch 2 --heads 14 --kv-heads 2 --seq 4096 --dim 64]
For each finalized graph: its tensors (uid, type, dims, strides, virtual / by value) and its
operations in order. runner's graphs use the same uids, types and operations; only the dims and
strides follow the call.
"""
import argparse
import json
import os
import sys
import tempfile

log = os.path.join(tempfile.mkdtemp(), "cudnn.log")
# cuDNN reads these when it loads, so before torch does.
os.environ["CUDNN_LOGLEVEL_DBG"] = "3"
os.environ["CUDNN_LOGDEST_DBG"] = log

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    bf16 = torch.bfloat16
    q = torch.randn(a.batch, a.heads, a.seq, a.dim, device="cuda", dtype=bf16, requires_grad=True)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.dim, device="cuda", dtype=bf16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o.float().sum().backward()
    torch.cuda.synchronize()
    print(f"# torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")

    seen = set()
    with open(log, errors="replace") as f:
        for line in f:
            marker = "apiLog: type=json; val="
            if marker not in line:
                continue
            record = json.loads(line.split(marker, 1)[1].rstrip().rstrip(";"))
            graph = record.get("operationGraph")
            if graph is None:
                continue
            key = json.dumps(graph["nodes"], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            print(f"\n== graph of {len(graph['nodes'])} operations ({graph.get('finalizeMode')})")
            for t in graph["tensors"]:
                kind = "virtual" if t["isVirtual"] else ("by value" if t["isByValue"] else "memory")
                print(f"  tensor {t['name']:>3} {t['dataType'][11:]:9} dims {t['dim']} "
                      f"strides {t['stride']} {kind}")
            for n in graph["nodes"]:
                fields = {k: v for k, v in n.items() if k not in ("operation", "alpha1", "alpha2")}
                print(f"  {n['operation'][24:-11]:10} {fields}")
    if not seen:
        sys.exit(f"no operation graph in {log}: did SDPA run on cuDNN?")


if __name__ == "__main__":
    main()
