// Cross-entropy rows of a chunk of logits, and their gradient written over the logits: the
// middle of the chunked LM-head loss (src/backend/cross_entropy.rs). One block per row:
//   lse = log sum_j exp(x_j)   (online max and sum in f32, one read of the row)
//   loss[r] = lse - x[target]  (0 for an ignored row: target < 0)
//   grad[j] = (exp(x_j - lse) - [j == target]) * scale,  scale = *inv_count, 0 when ignored
// `grad` (nullable) may be `x` itself: each element is read, then written by the same thread
// after the whole row has been read. Logits are bf16 or f32; arithmetic in f32.
// Reference: Liger-Kernel's fused linear cross-entropy (loss and gradient in the forward pass).
// bf16.cuh comes first (types and conversions).
// Compiled at run time by NVRTC (src/backend/cuda/cross_entropy.rs); no CUDA headers needed.

#define THREADS 512
#define NEG_INF (-__int_as_float(0x7f800000))

// Four consecutive elements (8-byte bf16 or 16-byte f32 accesses; callers check alignment).
__device__ __forceinline__ void load4(const bf16_t* p, float* v) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(w.x << 16);
    v[1] = __uint_as_float(w.x & 0xffff0000u);
    v[2] = __uint_as_float(w.y << 16);
    v[3] = __uint_as_float(w.y & 0xffff0000u);
}
__device__ __forceinline__ void load4(const float* p, float* v) {
    const float4 w = *reinterpret_cast<const float4*>(p);
    v[0] = w.x;
    v[1] = w.y;
    v[2] = w.z;
    v[3] = w.w;
}
__device__ __forceinline__ void store4(bf16_t* p, const float* v) {
    uint2 w;
    w.x = (unsigned)round_to(v[0], bf16_t()) | ((unsigned)round_to(v[1], bf16_t()) << 16);
    w.y = (unsigned)round_to(v[2], bf16_t()) | ((unsigned)round_to(v[3], bf16_t()) << 16);
    *reinterpret_cast<uint2*>(p) = w;
}
__device__ __forceinline__ void store4(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

// Adds x to the running (max m, sum s of exp(. - m)).
__device__ __forceinline__ void push(float& m, float& s, float x) {
    if (x > m) {
        s = s * __expf(m - x) + 1.f;
        m = x;
    } else {
        s += __expf(x - m);
    }
}

// (max, sum of exp(x - max)) merged with another such pair.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return;  // both empty
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}

template <typename T>
__device__ __forceinline__ void ce_rows(const T* x_all, T* grad_all, i64 ld, int vocab,
                                        const int* __restrict__ targets,
                                        const float* __restrict__ inv_count, float* row_loss) {
    __shared__ float sm[THREADS / 32], ss[THREADS / 32];
    __shared__ float row_lse, row_target;
    const int r = blockIdx.x;
    const T* x = x_all + (i64)r * ld;
    const int target = targets[r];
    const bool valid = target >= 0 && target < vocab;
    if (threadIdx.x == 0) row_target = valid ? to_f32(x[target]) : 0.f;

    // Rows start 8- or 16-byte aligned when ld is a multiple of 4 (allocations are aligned).
    const bool by4 = vocab % 4 == 0 && ld % 4 == 0;
    float m = NEG_INF, s = 0.f;
    if (by4) {
        for (int j = 4 * threadIdx.x; j < vocab; j += 4 * THREADS) {
            float v[4];
            load4(x + j, v);
#pragma unroll
            for (int k = 0; k < 4; k++) push(m, s, v[k]);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += THREADS) push(m, s, to_f32(x[j]));
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, off);
        const float s2 = __shfl_xor_sync(0xffffffff, s, off);
        merge(m, s, m2, s2);
    }
    if ((threadIdx.x & 31) == 0) {
        sm[threadIdx.x >> 5] = m;
        ss[threadIdx.x >> 5] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float bm = sm[0], bs = ss[0];
        for (int w = 1; w < THREADS / 32; w++) merge(bm, bs, sm[w], ss[w]);
        row_lse = bm + __logf(bs);
        row_loss[r] = valid ? row_lse - row_target : 0.f;
    }
    __syncthreads();
    if (!grad_all) return;
    T* g = grad_all + (i64)r * ld;
    const float lse = row_lse;
    const float scale = valid ? *inv_count : 0.f;
    if (by4) {
        for (int j = 4 * threadIdx.x; j < vocab; j += 4 * THREADS) {
            float v[4];
            load4(x + j, v);
#pragma unroll
            for (int k = 0; k < 4; k++) v[k] = (__expf(v[k] - lse) - (j + k == target ? 1.f : 0.f)) * scale;
            store4(g + j, v);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += THREADS) {
            const float p = __expf(to_f32(x[j]) - lse);
            g[j] = round_to((p - (j == target ? 1.f : 0.f)) * scale, T());
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    runner_ce_rows_bf16(const bf16_t* x, bf16_t* grad, i64 ld, int vocab, const int* targets,
                        const float* inv_count, float* row_loss) {
    ce_rows<bf16_t>(x, grad, ld, vocab, targets, inv_count, row_loss);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    runner_ce_rows_f32(const float* x, float* grad, i64 ld, int vocab, const int* targets,
                       const float* inv_count, float* row_loss) {
    ce_rows<float>(x, grad, ld, vocab, targets, inv_count, row_loss);
}
