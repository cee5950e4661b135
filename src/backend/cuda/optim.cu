// AdamW updates of flat parameters, torch's `_single_tensor_adamw` arithmetic in f32 (see
// src/backend/adamw.rs): reads the weights in the update's precision (f32), the gradient in the
// parameter's type (bf16 or f32), the moments; writes new weights, moments and, for a bf16
// parameter, the weights rounded to bf16 (round to nearest even, as burn's cast). Outputs may
// be the inputs' own memory: each element is read before it is written, by the same thread.
// Also the sum of squares of gradients, for global-norm clipping.
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

// Many parameters in one launch (torch's multi_tensor_apply scheme).
// The optimizer step of a LoRA run touches hundreds of small tensors (336 at Qwen2.5-0.5B); one
// launch each leaves the GPU idle between them. These kernels take a table of up to GROUP
// tensors as a by-value kernel parameter (under the 4 KB parameter limit) and split each tensor
// into CHUNK-element pieces, one block a piece; `first_block[i]` is tensor i's first block.
// GROUP and CHUNK come from optim.rs as defines.
#if !defined(GROUP) || !defined(CHUNK)
#error "compile through optim.rs, which defines GROUP and CHUNK"
#endif

struct AdamwTable {
    const float* w[GROUP];
    const void* g[GROUP];
    const float* m[GROUP];
    const float* v[GROUP];
    float* w_out[GROUP];
    bf16_t* low[GROUP];  // null: no bf16 copy of this tensor
    float* m_out[GROUP];
    float* v_out[GROUP];
    i64 n[GROUP];
    float decay[GROUP];      // 1 - lr * weight_decay (weight decay per tensor: none on norms)
    float step_size[GROUP];  // lr / bias_correction1 (per tensor: steps may differ)
    float sqrt_bc2[GROUP];
    int first_block[GROUP + 1];
};

struct SquaresTable {
    const void* g[GROUP];
    i64 n[GROUP];
    int first_block[GROUP + 1];
};

// The table entry of this block and the block's piece [start, end) of it.
template <typename Table>
__device__ __forceinline__ int block_entry(const Table& t, int count, i64& start, i64& end) {
    int i = 0;
    while (i + 1 < count && (int)blockIdx.x >= t.first_block[i + 1]) i++;
    start = (i64)((int)blockIdx.x - t.first_block[i]) * CHUNK;
    end = min(start + (i64)CHUNK, t.n[i]);
    return i;
}

template <typename G>
__device__ __forceinline__ void adamw_many(const AdamwTable& t, int count, const float* scale,
                                           float beta1, float one_minus_beta1, float beta2,
                                           float one_minus_beta2, float eps) {
    i64 start, end;
    const int e = block_entry(t, count, start, end);
    const float s = scale ? *scale : 1.0f;
    const G* g = reinterpret_cast<const G*>(t.g[e]);
    const float *w = t.w[e], *m = t.m[e], *v = t.v[e];
    float *w_out = t.w_out[e], *m_out = t.m_out[e], *v_out = t.v_out[e];
    bf16_t* low = t.low[e];
    const float decay = t.decay[e], step_size = t.step_size[e], sqrt_bc2 = t.sqrt_bc2[e];
    // `scale` (nullable): one f32 every gradient is multiplied by (global-norm clipping).
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
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

#define ADAMW_MANY_PARAMS                                                                 \
    const AdamwTable t, int count, const float *scale, float beta1, float one_minus_beta1, \
        float beta2, float one_minus_beta2, float eps

extern "C" __global__ void runner_adamw_many_grad_bf16(ADAMW_MANY_PARAMS) {
    adamw_many<bf16_t>(t, count, scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps);
}

extern "C" __global__ void runner_adamw_many_grad_f32(ADAMW_MANY_PARAMS) {
    adamw_many<float>(t, count, scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps);
}

// Sum of squares of each block's piece into partial[partial0 + blockIdx.x] (in f32; a fixed
// order, so the same gradients give the same norm on every run: no atomics).
template <typename G>
__device__ __forceinline__ void squares_many(const SquaresTable& t, int count, float* partial,
                                             int partial0) {
    __shared__ float warp_sums[32];
    i64 start, end;
    const int e = block_entry(t, count, start, end);
    const G* g = reinterpret_cast<const G*>(t.g[e]);
    float acc = 0.f;
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float x = load(g, i);
        acc = fmaf(x, x, acc);
    }
    for (int sh = 16; sh > 0; sh >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, sh);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) sum += warp_sums[w];
        partial[partial0 + blockIdx.x] = sum;
    }
}

extern "C" __global__ void runner_squares_many_bf16(const SquaresTable t, int count,
                                                    float* partial, int partial0) {
    squares_many<bf16_t>(t, count, partial, partial0);
}

extern "C" __global__ void runner_squares_many_f32(const SquaresTable t, int count,
                                                   float* partial, int partial0) {
    squares_many<float>(t, count, partial, partial0);
}

// out[0] = the sum of partial[0..n] in a fixed order (one block): each thread sums a strided
// slice, then a fixed tree.
extern "C" __global__ void runner_sum_partials(const float* partial, int n, float* out) {
    __shared__ float sums[256];
    float acc = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) sums[threadIdx.x] += sums[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = sums[0];
}
