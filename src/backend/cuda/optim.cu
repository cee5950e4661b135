// One AdamW update of a flat parameter, torch's `_single_tensor_adamw` arithmetic in f32 (see
// src/backend/adamw.rs): reads the weights in the update's precision (f32), the gradient in the
// parameter's type (bf16 or f32), the moments; writes new weights, moments and, for a bf16
// parameter, the weights rounded to bf16 (round to nearest even, as burn's cast).
// The scalars (1 - beta, 1 - lr wd, lr / bc1, sqrt(bc2)) come from the host in f64 rounded to
// f32, as burn's scalar operations get them, so the two paths agree to rounding.
// Compiled at run time by NVRTC (src/backend/cuda/optim.rs); no CUDA headers needed.

typedef unsigned short bf16_t;
typedef long long i64;

__device__ __forceinline__ float bf16_to_f32(bf16_t x) {
    return __uint_as_float(((unsigned)x) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float x) {
    unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
        return (bf16_t)((bits >> 16) | 0x0040u);  // NaN stays NaN
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16_t)(bits >> 16);
}

__device__ __forceinline__ float load(const bf16_t* p, i64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float load(const float* p, i64 i) { return p[i]; }

// `scale` (nullable): one f32 the gradient is multiplied by (global-norm clipping).
// `low` (nullable): the bf16 copy of the new weights.
template <typename G>
__device__ __forceinline__ void adamw(const float* __restrict__ w, const G* __restrict__ g,
                                      const float* __restrict__ m, const float* __restrict__ v,
                                      const float* __restrict__ scale, float* __restrict__ w_out,
                                      bf16_t* __restrict__ low, float* __restrict__ m_out,
                                      float* __restrict__ v_out, i64 n, float decay, float beta1,
                                      float one_minus_beta1, float beta2, float one_minus_beta2,
                                      float step_size, float sqrt_bc2, float eps) {
    const float s = scale ? *scale : 1.0f;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = load(g, i) * s;
        const float mi = m[i] * beta1 + gi * one_minus_beta1;
        const float vi = v[i] * beta2 + (gi * gi) * one_minus_beta2;
        const float denom = sqrtf(vi) / sqrt_bc2 + eps;
        const float wi = w[i] * decay - (mi / denom) * step_size;
        w_out[i] = wi;
        m_out[i] = mi;
        v_out[i] = vi;
        if (low) low[i] = f32_to_bf16(wi);
    }
}

#define ADAMW_PARAMS(G)                                                                        \
    const float *w, const G *g, const float *m, const float *v, const float *scale,           \
        float *w_out, bf16_t *low, float *m_out, float *v_out, i64 n, float decay, float beta1, \
        float one_minus_beta1, float beta2, float one_minus_beta2, float step_size,            \
        float sqrt_bc2, float eps

extern "C" __global__ void runner_adamw_grad_bf16(ADAMW_PARAMS(bf16_t)) {
    adamw(w, g, m, v, scale, w_out, low, m_out, v_out, n, decay, beta1, one_minus_beta1, beta2,
          one_minus_beta2, step_size, sqrt_bc2, eps);
}

extern "C" __global__ void runner_adamw_grad_f32(ADAMW_PARAMS(float)) {
    adamw(w, g, m, v, scale, w_out, low, m_out, v_out, n, decay, beta1, one_minus_beta1, beta2,
          one_minus_beta2, step_size, sqrt_bc2, eps);
}
