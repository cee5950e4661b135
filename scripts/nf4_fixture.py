"""Writes tests/fixtures/train/nf4.json: NF4 quantization as bitsandbytes 0.50 does it on CPU.

torch is not installed here, so this script reproduces bitsandbytes' torch code with numpy float32
and calls bitsandbytes' own CPU library (libbitsandbytes_cpu.so from the PyPI wheel) through ctypes:
- quantize_4bit: bitsandbytes/backends/default/ops.py `quantize_4bit` (pure torch, the op CPU uses):
  absmax per block of 64, scaled = clamp(A * (1 / absmax), -1, 1), q = bucketize(scaled, midpoints)
  (torch.bucketize right=False == numpy searchsorted side="left"), packed = q[0::2] << 4 | q[1::2].
- compress_statistics (functional.py quantize_4bit): offset = absmax.mean(), then
  quantize_blockwise(absmax - offset, blocksize=256) with code = create_dynamic_map(signed=True),
  reproduced from backends/default/ops.py `quantize_blockwise` (nearest code value through
  bucketize on midpoints, ties to the lower code). bitsandbytes' C CPU kernel
  `cquantize_blockwise_cpu_fp32` (BinSearch Direct2) is also run and its codes recorded as
  `absmax_q_c_kernel`: it is not exact near zero (0.0 -> code 131 = 2.1e-5), so runner follows the
  default op, which is what the nearest-value CUDA kernel also computes.
- dequantize: code[absmax_q] * absmax2 + offset, then the real C kernel
  `cdequantize_blockwise_cpu_nf4_fp32` for the weights (high nibble first).
create_dynamic_map (functional.py lines 296-348) is reproduced with float32 arithmetic; torch.linspace
is emulated with its scalar CPU formula, which may differ from torch's vectorised path by an ulp.
Usage: pip download --no-deps bitsandbytes==0.50.2 && unzip; BNB_LIB=.../libbitsandbytes_cpu.so python3 nf4_fixture.py
"""

import ctypes as ct
import json
import os

import numpy as np

f32 = np.float32

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=f32)


def linspace_f32(start, end, steps):
    # aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp linspace_kernel, scalar path
    start, end = f32(start), f32(end)
    step = f32((end - start) / f32(steps - 1))
    half = steps // 2
    return np.array([start + step * f32(i) if i < half else end - step * f32(steps - i - 1)
                     for i in range(steps)], dtype=f32)


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    assert additional_items == 0
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        b = linspace_f32(0.1, 1, fraction_items)
        means = (b[:-1] + b[1:]) / f32(2.0)
        scale = f32(10 ** (-(max_exponent_bits - 1) + i))
        data += list(scale * means)
        if signed:
            data += list(-scale * means)
    data.append(f32(0))
    data.append(f32(1.0))
    data += [f32(0)] * (256 - len(data))
    data.sort()
    return np.array(data, dtype=f32)


def short(a):
    # shortest decimal that round-trips each float32 (str(np.float32)), to keep the JSON small
    return [float(str(v)) for v in np.asarray(a, dtype=f32)]


def ptr(a):
    return ct.c_void_p(a.ctypes.data)


def main():
    lib = ct.cdll.LoadLibrary(os.environ.get("BNB_LIB", "/tmp/pkgs/x/bitsandbytes/libbitsandbytes_cpu.so"))
    code = create_dynamic_map(signed=True)
    midpoints = (NF4[:-1] + NF4[1:]) / f32(2)
    rng = np.random.default_rng(1234)
    cases = []
    inputs = [
        ("normal_4x128", (rng.standard_normal((4, 128)) * 0.02).astype(f32)),
        ("mixed_scales_40x64", (rng.standard_normal((40, 64)) * np.exp(rng.uniform(-6, 2, (40, 1)))).astype(f32)),
        # exact NF4 midpoints (ties go to the lower code) and code values; absmax 1.0 leaves them unscaled
        ("midpoints_and_zero_2x64", np.tile(np.concatenate([midpoints, -midpoints, NF4, np.zeros(4, f32),
                                                            np.linspace(-1, 1, 14, dtype=f32)]), (2, 1)).astype(f32)),
        ("tail_3x50", rng.uniform(-3, 3, (3, 50)).astype(f32)),
        # 260 blocks: two blocks of the 256-wide absmax quantization; 3-digit inputs keep the file small.
        ("many_blocks_4x4160", (rng.integers(-999, 1000, (4, 4160)) / 1000 * 0.05 + 0.01).astype(f32)),
    ]
    for name, a in inputs:
        flat = a.reshape(-1)
        n = flat.size
        blocks = -(n // -64)
        absmax = np.array([np.abs(flat[i * 64:(i + 1) * 64]).max() for i in range(blocks)], dtype=f32)
        scaled = np.concatenate([np.clip(flat[i * 64:(i + 1) * 64] * (f32(1.0) / max(absmax[i], f32(1e-38))), -1, 1)
                                 for i in range(blocks)]).astype(f32)
        if scaled.size % 2:
            scaled = np.pad(scaled, (0, 1))
        q = np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)
        packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
        offset = f32(absmax.mean(dtype=f32))
        centered = (absmax - offset).astype(f32)
        blocks2 = -(centered.size // -256)
        absmax_q_c = np.empty(centered.size, dtype=np.uint8)
        absmax2_c = np.empty(blocks2, dtype=f32)
        lib.cquantize_blockwise_cpu_fp32(ptr(code), ptr(centered), ptr(absmax2_c), ptr(absmax_q_c),
                                         ct.c_longlong(256), ct.c_longlong(centered.size))
        absmax2 = np.array([np.abs(centered[i * 256:(i + 1) * 256]).max() for i in range(blocks2)], dtype=f32)
        scaled2 = np.concatenate([np.clip(centered[i * 256:(i + 1) * 256] * (f32(1.0) / max(absmax2[i], f32(1e-38))), -1, 1)
                                  for i in range(blocks2)]).astype(f32)
        absmax_q = np.searchsorted((code[:-1] + code[1:]) / f32(2), scaled2, side="left").astype(np.uint8)
        absmax_dq = np.empty(centered.size, dtype=f32)
        lib.cdequantize_blockwise_cpu_fp32(ptr(code), ptr(absmax_q), ptr(absmax2), ptr(absmax_dq),
                                           ct.c_longlong(256), ct.c_longlong(centered.size))
        absmax_dq = (absmax_dq + offset).astype(f32)
        out = np.empty(a.shape, dtype=f32)
        packed_c = np.ascontiguousarray(packed)
        lib.cdequantize_blockwise_cpu_nf4_fp32(ptr(packed_c), ptr(absmax_dq), ptr(out), ct.c_longlong(64),
                                               ct.c_longlong(a.shape[0]), ct.c_longlong(a.shape[1]))
        cases.append({
            "name": name, "shape": list(a.shape), "input": short(flat), "packed": packed.tolist(),
            "absmax": short(absmax), "offset": float(str(offset)), "absmax_q": absmax_q.tolist(),
            "absmax2": short(absmax2), "absmax_q_c_kernel": absmax_q_c.tolist(),
            "absmax_dequantized": short(absmax_dq),
            # the large case's dequantized values are left out to keep the file small
            "output": short(out.reshape(-1)) if out.size <= 4096 else None,
        })
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "nf4.json")
    with open(path, "w") as f:
        json.dump({"nf4_code": short(NF4), "dynamic_code": short(code), "cases": cases}, f)
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
