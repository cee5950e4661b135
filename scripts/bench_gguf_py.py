#!/usr/bin/env python3
"""gguf-py quantization time for Qwen2.5-0.5B-shaped random f32 arrays (the Rust benchmark
`bench_export_qwen2_0_5b` exports the same shapes). gguf-py quantizes Q8_0 (and Q5_0 / Q4_0) but
has no K-quant quantizer, so Q4_K_M cannot be timed here; the Q8_0 run writes a GGUF too.

Usage: python3 scripts/bench_gguf_py.py
"""
import os
import tempfile
import time

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

H, FFN, VOCAB, LAYERS, KV = 896, 4864, 151936, 24, 128


def shapes():
    yield "token_embd.weight", (VOCAB, H)
    yield "output_norm.weight", (H,)
    for l in range(LAYERS):
        p = f"blk.{l}."
        yield p + "attn_norm.weight", (H,)
        yield p + "ffn_norm.weight", (H,)
        yield p + "attn_q.weight", (H, H)
        yield p + "attn_q.bias", (H,)
        yield p + "attn_k.weight", (KV, H)
        yield p + "attn_k.bias", (KV,)
        yield p + "attn_v.weight", (KV, H)
        yield p + "attn_v.bias", (KV,)
        yield p + "attn_output.weight", (H, H)
        yield p + "ffn_gate.weight", (FFN, H)
        yield p + "ffn_up.weight", (FFN, H)
        yield p + "ffn_down.weight", (H, FFN)


def main() -> None:
    rng = np.random.default_rng(0)
    arrays = {n: rng.uniform(-0.1, 0.1, size=s).astype(np.float32) for n, s in shapes()}
    t0 = time.time()
    qd = {n: (quants.quantize(a, T.Q8_0) if a.ndim == 2 else a) for n, a in arrays.items()}
    t1 = time.time()
    print(f"gguf-py Q8_0 quantization only: {t1 - t0:.2f} s")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.gguf")
        w = gguf.GGUFWriter(path, "qwen2")
        for n, q in qd.items():
            if q.dtype == np.uint8:
                w.add_tensor(n, q, raw_shape=q.shape, raw_dtype=T.Q8_0)
            else:
                w.add_tensor(n, q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        t2 = time.time()
        print(f"gguf-py Q8_0 quantize + write: {t2 - t0:.2f} s, {os.path.getsize(path) / 1048576:.1f} MiB")


if __name__ == "__main__":
    main()
