// bf16 as raw 16-bit words and the conversions the kernels share (prepended to norm.cu,
// rope.cu and cross_entropy.cu by their .rs files: NVRTC compiles each source on its own).

typedef unsigned short bf16_t;
typedef long long i64;

__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ float to_f32(float x) { return x; }

// Round to nearest even, as burn's cast; NaN stays NaN. The second argument picks the type.
__device__ __forceinline__ bf16_t round_to(float x, bf16_t) {
    unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
        return (bf16_t)((bits >> 16) | 0x0040u);
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16_t)(bits >> 16);
}
__device__ __forceinline__ float round_to(float x, float) { return x; }
