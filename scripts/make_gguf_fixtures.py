#!/usr/bin/env python3
"""Fixtures for runner-gguf tests (tests/fixtures/gguf/).

Reference quantizations of a deterministic f32 input:
  * gguf-py (`pip install gguf`, numpy port of ggml-quants.c): F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
  * ggml's own C reference (quantize_row_q4_K_ref / quantize_row_q6_K_ref), loaded with ctypes from a
    shared library built from llama.cpp's ggml/src/ggml-quants.c:
        gcc -O2 -shared -fPIC -I$LLAMA/ggml/include -I$LLAMA/ggml/src $LLAMA/ggml/src/ggml-quants.c \
            -o /tmp/libggmlq.so -Wl,--unresolved-symbols=ignore-all
    (path in $GGML_QUANTS_LIB, default /tmp/libggmlq.so). gguf-py has no K-quant quantizers.
  * gguf-py dequantization of Q4_K / Q5_K / Q6_K blocks (Q5_K from random blocks with sane scales).
A small GGUF written by gguf-py's GGUFWriter with every metadata type and several tensor types.

Usage: python3 scripts/make_gguf_fixtures.py
"""
import ctypes
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf")
ROWS, COLS = 8, 512


def make_input() -> np.ndarray:
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
    x[1] *= 40.0                       # large magnitudes
    x[2, :256] = 0.0                   # an all-zero super-block
    x[3, :64] = 0.25                   # constant blocks
    x[3, 64:96] = -0.5
    x[4] = np.abs(x[4])                # all positive (min > 0 paths)
    x[5, ::7] = 1e-8                   # tiny values
    x[6, :32] = np.linspace(-1, 1, 32, dtype=np.float32)  # exact half steps / ties
    x[7, 100] = 3.0                    # one outlier
    return x


def ggml_ref(name: str, x: np.ndarray, block_bytes: int, qk: int) -> bytes | None:
    path = os.environ.get("GGML_QUANTS_LIB", "/tmp/libggmlq.so")
    if not os.path.exists(path):
        print(f"skip {name}: {path} not found", file=sys.stderr)
        return None
    lib = ctypes.CDLL(path, mode=os.RTLD_LAZY)
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    src = np.ascontiguousarray(x.reshape(-1), dtype=np.float32)
    dst = np.zeros(src.size // qk * block_bytes, dtype=np.uint8)
    fn(src.ctypes.data, dst.ctypes.data, src.size)
    return dst.tobytes()


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    x = make_input()
    x.tofile(os.path.join(OUT, "input_8x512.f32"))
    for qt in [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]:
        q = quants.quantize(x, qt)
        q.tofile(os.path.join(OUT, f"quant_{qt.name.lower()}.bin"))
        quants.dequantize(q, qt).astype(np.float32).tofile(os.path.join(OUT, f"dequant_{qt.name.lower()}.f32"))
    for name, qt, bb in [("quantize_row_q4_K_ref", T.Q4_K, 144), ("quantize_row_q6_K_ref", T.Q6_K, 210)]:
        q = ggml_ref(name, x, bb, 256)
        if q is None:
            continue
        open(os.path.join(OUT, f"quant_{qt.name.lower()}.bin"), "wb").write(q)
        deq = quants.dequantize(np.frombuffer(q, dtype=np.uint8).reshape(ROWS, -1), qt)
        deq.astype(np.float32).tofile(os.path.join(OUT, f"dequant_{qt.name.lower()}.f32"))
    # Q5_K: random blocks whose d/dmin are sane fp16 values, dequantized by gguf-py.
    rng = np.random.default_rng(99)
    blocks = rng.integers(0, 256, size=(4, 176), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(0.003).tobytes(), dtype=np.uint8)
    blocks.tofile(os.path.join(OUT, "quant_q5_k.bin"))
    quants.dequantize(blocks.reshape(1, -1), T.Q5_K).astype(np.float32).tofile(os.path.join(OUT, "dequant_q5_k.f32"))

    # A small GGUF from gguf-py's writer: every metadata type, arrays, several tensor types.
    w = gguf.GGUFWriter(os.path.join(OUT, "tiny_gguf_py.gguf"), "llama")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 1.5)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo ✓")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", 2.25)
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_str", ["a", "bc", ""])
    w.add_key_value("test.arr_nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.ARRAY)
    w.add_tensor("t_f32", x[:2, :64].copy())
    w.add_tensor("t_f16", x[:2, :64].astype(np.float16))
    q8 = quants.quantize(x[:2], T.Q8_0)
    w.add_tensor("t_q8_0", q8, raw_shape=q8.shape, raw_dtype=T.Q8_0)
    q4 = quants.quantize(x[:2], T.Q4_0)
    w.add_tensor("t_q4_0", q4, raw_shape=q4.shape, raw_dtype=T.Q4_0)
    w.add_tensor("t_1d", x[0, :10].copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("fixtures written to", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
