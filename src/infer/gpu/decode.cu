// The GPU decode engine's kernels (src/infer/gpu): everything of a decoder layer between the
// cuBLAS products, for a list of tokens that each name their row, cache slot and position, so
// one code path runs prefill chunks (many tokens of few rows) and decode steps (one token per
// row). T is bf16_t or float (bf16.cuh comes first); arithmetic is f32 and values are rounded
// to T where transformers rounds them, so greedy tokens follow the burn decoder's.
//
// Layouts, row-major: the residual stream h [n, H] in f32 (rounded to T after each add, as a T
// residual would be); qkv [n, (nh + 2 nkv) d] (the q, k, v products side by side); the caches
// [rows, cap, nkv, d] per layer; gate_up [n, 2 I] (gate then up).
// Compiled at run time by NVRTC (src/infer/gpu/kernels.rs).

typedef int i32;
typedef unsigned long long u64;

#define ATTN_WARPS 8
#define NEG_INF (-__int_as_float(0x7f800000))
#define MAX_HEAD_DIM 256

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) sh[w] = v;
    __syncthreads();
    const int nw = blockDim.x >> 5;
    float t = (lane < nw) ? sh[lane] : 0.f;
    t = warp_sum(t);
    __syncthreads();
    return t;
}

template <typename T>
__device__ __forceinline__ float rnd(float x) {
    return to_f32(round_to(x, T()));
}

// h[t] = table[ids[t]]; grid (ceil(H / 256), n), 256 threads.
template <typename T>
__device__ void embed(const T* __restrict__ table, const i32* __restrict__ ids, float* __restrict__ h,
                      int H) {
    const int t = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < H) h[(i64)t * H + j] = to_f32(table[(i64)ids[t] * H + j]);
}

// With `delta`: h += delta (+ bias), rounded to T. Then out = round(round(h r) w), r the inverse
// RMS of h's row. One block of 256 threads a row.
template <typename T>
__device__ void add_norm(float* __restrict__ h, const T* __restrict__ delta, const T* __restrict__ bias,
                         const T* __restrict__ w, T* __restrict__ out, int H, float eps) {
    __shared__ float sh[32];
    const i64 base = (i64)blockIdx.x * H;
    float sq = 0.f;
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        float v = h[base + j];
        if (delta) {
            float d = to_f32(delta[base + j]);
            if (bias) d = rnd<T>(d + to_f32(bias[j]));
            v = rnd<T>(v + d);
            h[base + j] = v;
        }
        sq = fmaf(v, v, sq);
    }
    const float r = rsqrtf(block_sum(sq, sh) / (float)H + eps);
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        out[base + j] = round_to(rnd<T>(h[base + j] * r) * to_f32(w[j]), T());
    }
}

// One head of one token: bias, the optional per-head RMSNorm (Qwen3), rotary embedding (halves
// of the head, HF rotate_half) for q and k; q goes to q_out [n, nh, d], k and v to the caches
// at the token's row and slot. Grid (n, nh + 2 nkv), 128 threads (head_dim <= 256).
template <typename T>
__device__ void qkv_post(const T* __restrict__ qkv, const T* __restrict__ bias,
                         const T* __restrict__ q_norm, const T* __restrict__ k_norm,
                         const float* __restrict__ inv_freq, const i32* __restrict__ pos,
                         const i32* __restrict__ row, const i32* __restrict__ slot,
                         T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
                         int nh, int nkv, int d, int cap, float eps) {
    __shared__ float sh[32];
    const int t = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = d / 2;
    const int width = (nh + 2 * nkv) * d;
    const T* src = qkv + (i64)t * width + (i64)head * d;
    const bool live = i < half;
    float x1 = 0.f, x2 = 0.f;
    if (live) {
        x1 = to_f32(src[i]);
        x2 = to_f32(src[i + half]);
        if (bias) {
            x1 = rnd<T>(x1 + to_f32(bias[head * d + i]));
            x2 = rnd<T>(x2 + to_f32(bias[head * d + i + half]));
        }
    }
    const i64 cache_row = ((i64)row[t] * cap + slot[t]) * nkv;
    if (head >= nh + nkv) {
        if (live) {
            T* dst = v_cache + (cache_row + (head - nh - nkv)) * d;
            dst[i] = round_to(x1, T());
            dst[i + half] = round_to(x2, T());
        }
        return;
    }
    const T* norm = head < nh ? q_norm : k_norm;
    if (norm) {
        const float r = rsqrtf(block_sum(x1 * x1 + x2 * x2, sh) / (float)d + eps);
        if (live) {
            x1 = rnd<T>(rnd<T>(x1 * r) * to_f32(norm[i]));
            x2 = rnd<T>(rnd<T>(x2 * r) * to_f32(norm[i + half]));
        }
    }
    if (!live) return;
    float s, c;
    sincosf((float)pos[t] * inv_freq[i], &s, &c);
    c = rnd<T>(c);
    s = rnd<T>(s);
    const float o1 = x1 * c - x2 * s, o2 = x2 * c + x1 * s;
    T* dst = head < nh ? q_out + ((i64)t * nh + head) * d
                       : k_cache + (cache_row + (head - nh)) * d;
    dst[i] = round_to(o1, T());
    dst[i + half] = round_to(o2, T());
}

// Attention of one query head of one token over its row's cached keys 0..=slot (the last
// `window` of them when window > 0), with the online softmax in f32: each warp takes every
// ATTN_WARPS-th key, the warps' partial sums are merged at the end. Grid (n, nh),
// 32 * ATTN_WARPS threads.
template <typename T>
__device__ void attend(const T* __restrict__ q, const T* __restrict__ k_cache,
                       const T* __restrict__ v_cache, const i32* __restrict__ row,
                       const i32* __restrict__ slot, T* __restrict__ out, int nh, int nkv, int d,
                       int cap, float scale, int window) {
    __shared__ float s_max[ATTN_WARPS], s_sum[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][MAX_HEAD_DIM];
    const int t = blockIdx.x, head = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kvh = head / (nh / nkv);
    const int len = slot[t] + 1;
    const int first = window > 0 && len > window ? len - window : 0;
    const T* qh = q + ((i64)t * nh + head) * d;
    float qv[MAX_HEAD_DIM / 32], acc[MAX_HEAD_DIM / 32];
#pragma unroll
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) {
        const int j = lane + 32 * e;
        qv[e] = j < d ? to_f32(qh[j]) * scale : 0.f;
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const i64 base = (i64)row[t] * cap;
    for (int s = first + w; s < len; s += ATTN_WARPS) {
        const i64 at = ((base + s) * nkv + kvh) * d;
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < MAX_HEAD_DIM / 32; e++) {
            const int j = lane + 32 * e;
            if (j < d) dot = fmaf(qv[e], to_f32(k_cache[at + j]), dot);
        }
        dot = warp_sum(dot);
        const float mn = fmaxf(m, dot);
        const float corr = expf(m - mn), p = expf(dot - mn);
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < MAX_HEAD_DIM / 32; e++) {
            const int j = lane + 32 * e;
            if (j < d) acc[e] = fmaf(p, to_f32(v_cache[at + j]), acc[e] * corr);
        }
        m = mn;
    }
    if (lane == 0) {
        s_max[w] = m;
        s_sum[w] = l;
    }
#pragma unroll
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) {
        const int j = lane + 32 * e;
        if (j < d) s_acc[w][j] = acc[e];
    }
    __syncthreads();
    float top = NEG_INF;
    for (int k = 0; k < ATTN_WARPS; k++) top = fmaxf(top, s_max[k]);
    float total = 0.f;
    for (int k = 0; k < ATTN_WARPS; k++) {
        if (s_max[k] > NEG_INF) total += s_sum[k] * expf(s_max[k] - top);
    }
    T* o = out + ((i64)t * nh + head) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = 0.f;
        for (int k = 0; k < ATTN_WARPS; k++) {
            if (s_max[k] > NEG_INF) v += s_acc[k][j] * expf(s_max[k] - top);
        }
        o[j] = round_to(v / total, T());
    }
}

// out[t, j] = round(round(silu(gate)) up); grid (ceil(I / 256), n), 256 threads.
template <typename T>
__device__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int I) {
    const int t = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= I) return;
    const float g = to_f32(gate_up[(i64)t * 2 * I + j]);
    const float u = to_f32(gate_up[(i64)t * 2 * I + I + j]);
    out[(i64)t * I + j] = round_to(rnd<T>(g / (1.f + expf(-g))) * u, T());
}

// dst[i] = src[index[i]], rows of H values; grid (m), 256 threads.
template <typename T>
__device__ void gather_rows(const T* __restrict__ src, const i32* __restrict__ index,
                            T* __restrict__ dst, int H) {
    const i64 from = (i64)index[blockIdx.x] * H, to = (i64)blockIdx.x * H;
    for (int j = threadIdx.x; j < H; j += blockDim.x) dst[to + j] = src[from + j];
}

// splitmix64's finaliser.
__device__ __forceinline__ u64 mix64(u64 x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// The largest (value, index) pair over the warp, ties to the lower index; every lane gets it.
__device__ __forceinline__ void warp_best(float& best, int& idx) {
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffff, best, off);
        const int oi = __shfl_xor_sync(0xffffffff, idx, off);
        if (ov > best || (ov == best && oi < idx)) {
            best = ov;
            idx = oi;
        }
    }
}

// Per row r the token with the largest key: the logit (greedy, keys == 0) or, to sample from
// softmax(logit / temperature), logit * inv_temp + Gumbel noise drawn from (keys[r], token)
// (the Gumbel-max trick: the argmax is distributed as the softmax). Ties go to the lower
// token. Grid (rows), 1024 threads.
template <typename T>
__device__ void pick(const T* __restrict__ logits, int vocab, const u64* __restrict__ keys,
                     float inv_temp, i32* __restrict__ out) {
    __shared__ float s_val[32];
    __shared__ int s_idx[32];
    const int r = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const T* x = logits + (i64)r * vocab;
    const u64 key = keys ? keys[r] : 0ull;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = to_f32(x[j]);
        if (keys) {
            const u64 bits = mix64(key ^ mix64((u64)j + 0x9e3779b97f4a7c15ull));
            // An exponential draw E = -log(1 - U) with U in (0, 1) from the top 32 bits; the
            // Gumbel noise is -log(E).
            const float u = ((float)(bits >> 32) + 0.5f) * 2.3283064365386963e-10f;
            v = v * inv_temp - logf(-log1pf(-u));
        }
        if (v > best || (v == best && j < idx)) {
            best = v;
            idx = j;
        }
    }
    warp_best(best, idx);
    if (lane == 0) {
        s_val[w] = best;
        s_idx[w] = idx;
    }
    __syncthreads();
    if (w == 0) {
        const int nw = blockDim.x >> 5;
        best = lane < nw ? s_val[lane] : NEG_INF;
        idx = lane < nw ? s_idx[lane] : 0x7fffffff;
        warp_best(best, idx);
        // A row of NaNs picks token 0.
        if (lane == 0) out[r] = idx == 0x7fffffff ? 0 : idx;
    }
}

#define DECODE_KERNELS(SUFFIX, T)                                                                 \
    extern "C" __global__ void runner_embed_##SUFFIX(const T* table, const i32* ids, float* h,     \
                                                     int H) {                                      \
        embed<T>(table, ids, h, H);                                                                \
    }                                                                                              \
    extern "C" __global__ void runner_add_norm_##SUFFIX(float* h, const T* delta, const T* bias,  \
                                                        const T* w, T* out, int H, float eps) {    \
        add_norm<T>(h, delta, bias, w, out, H, eps);                                               \
    }                                                                                              \
    extern "C" __global__ void runner_qkv_post_##SUFFIX(                                          \
        const T* qkv, const T* bias, const T* q_norm, const T* k_norm, const float* inv_freq,      \
        const i32* pos, const i32* row, const i32* slot, T* q_out, T* k_cache, T* v_cache, int nh, \
        int nkv, int d, int cap, float eps) {                                                      \
        qkv_post<T>(qkv, bias, q_norm, k_norm, inv_freq, pos, row, slot, q_out, k_cache, v_cache,  \
                    nh, nkv, d, cap, eps);                                                         \
    }                                                                                              \
    extern "C" __global__ void runner_attend_##SUFFIX(const T* q, const T* k_cache,              \
                                                      const T* v_cache, const i32* row,            \
                                                      const i32* slot, T* out, int nh, int nkv,    \
                                                      int d, int cap, float scale, int window) {   \
        attend<T>(q, k_cache, v_cache, row, slot, out, nh, nkv, d, cap, scale, window);            \
    }                                                                                              \
    extern "C" __global__ void runner_silu_mul_##SUFFIX(const T* gate_up, T* out, int I) {        \
        silu_mul<T>(gate_up, out, I);                                                              \
    }                                                                                              \
    extern "C" __global__ void runner_gather_rows_##SUFFIX(const T* src, const i32* index, T* dst, \
                                                           int H) {                                \
        gather_rows<T>(src, index, dst, H);                                                        \
    }                                                                                              \
    extern "C" __global__ void runner_pick_##SUFFIX(const T* logits, int vocab, const u64* keys,  \
                                                    float inv_temp, i32* out) {                    \
        pick<T>(logits, vocab, keys, inv_temp, out);                                               \
    }

DECODE_KERNELS(bf16, bf16_t)
DECODE_KERNELS(f32, float)
