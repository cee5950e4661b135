// NF4 dequantization of a QLoRA base weight (src/backend/nf4.rs has the layout): one thread per
// packed word of 8 nibbles, i.e. 8 consecutive values of one 64-value block.
//   absmax = round(round(dynamic[q] * scale[block / 256]) + offset)
//   value  = round(code[nibble] * absmax)
// with every product rounded to T as burn's composed ops round them, so bf16 results agree with
// the reference to the last bit wherever f32 products do.
// bf16.cuh comes first (types and conversions).
// Compiled at run time by NVRTC (src/backend/cuda/nf4.rs).

template <typename T>
__device__ __forceinline__ void nf4_dequantize(const int* packed, const int* codes,
                                               const T* scales, const T* code, const T* dyn,
                                               T* out, i64 n, float offset) {
    const i64 words = (n + 7) / 8;
    for (i64 w = (i64)blockIdx.x * blockDim.x + threadIdx.x; w < words;
         w += (i64)gridDim.x * blockDim.x) {
        const i64 block = w / 8;
        const unsigned cw = (unsigned)codes[block / 4];
        const int q = (int)((cw >> (24 - 8 * (int)(block % 4))) & 0xFFu);
        const float scaled = to_f32(round_to(to_f32(dyn[q]) * to_f32(scales[block / 256]), T()));
        const float absmax = to_f32(round_to(scaled + offset, T()));
        const unsigned word = (unsigned)packed[w];
        const i64 first = w * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const i64 i = first + j;
            if (i < n) {
                const int nib = (int)((word >> (28 - 4 * j)) & 0xFu);
                out[i] = round_to(to_f32(code[nib]) * absmax, T());
            }
        }
    }
}

#define NF4(NAME, T)                                                                            \
    extern "C" __global__ void NAME(const int* packed, const int* codes, const T* scales,       \
                                    const T* code, const T* dyn, T* out, i64 n, float offset) { \
        nf4_dequantize<T>(packed, codes, scales, code, dyn, out, n, offset);                    \
    }
NF4(runner_nf4_dequantize_bf16, bf16_t)
NF4(runner_nf4_dequantize_f32, float)
