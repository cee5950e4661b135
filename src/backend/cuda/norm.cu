// RMSNorm over the last axis of x [rows, h] (bf16 or f32), one warp per row, f32 arithmetic:
//   forward:  r = 1 / sqrt(mean(x^2) + eps);  y = round(round(x r) w)   (transformers' order:
//             the normalized row is rounded to x's type before the weight multiplies it)
//   backward: with xh = x r and g = dy w:  dx = r (g - xh mean(g xh))
// r is kept per row in f32 for the backward pass. The weight's gradient is left to burn's ops
// (it is frozen under LoRA). bf16.cuh comes first (types and conversions).
// Compiled at run time by NVRTC (src/backend/cuda/norm.rs).

#define ROWS_PER_BLOCK 4  // one warp each

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
    return v;
}

template <typename T>
__device__ __forceinline__ void rms_forward(const T* __restrict__ x, const T* __restrict__ w,
                                            T* __restrict__ y, float* __restrict__ inv, int rows,
                                            int h, float eps) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (i64)row * h;
    float sq = 0.f;
    for (int j = lane; j < h; j += 32) {
        const float v = to_f32(xr[j]);
        sq = fmaf(v, v, sq);
    }
    const float r = 1.0f / sqrtf(warp_sum(sq) / (float)h + eps);
    if (lane == 0) inv[row] = r;
    T* yr = y + (i64)row * h;
    for (int j = lane; j < h; j += 32) {
        const float normed = to_f32(round_to(to_f32(xr[j]) * r, T()));
        yr[j] = round_to(normed * to_f32(w[j]), T());
    }
}

template <typename T>
__device__ __forceinline__ void rms_backward(const T* __restrict__ x, const T* __restrict__ w,
                                             const float* __restrict__ inv,
                                             const T* __restrict__ dy, T* __restrict__ dx,
                                             int rows, int h) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const i64 base = (i64)row * h;
    const float r = inv[row];
    float dot = 0.f;
    for (int j = lane; j < h; j += 32) {
        const float g = to_f32(dy[base + j]) * to_f32(w[j]);
        dot = fmaf(g, to_f32(x[base + j]) * r, dot);
    }
    const float mean = warp_sum(dot) / (float)h;
    for (int j = lane; j < h; j += 32) {
        const float g = to_f32(dy[base + j]) * to_f32(w[j]);
        const float xh = to_f32(x[base + j]) * r;
        dx[base + j] = round_to(r * (g - xh * mean), T());
    }
}

#define FORWARD(NAME, T)                                                                         \
    extern "C" __global__ void NAME(const T* x, const T* w, T* y, float* inv, int rows, int h, \
                                    float eps) {                                               \
        rms_forward<T>(x, w, y, inv, rows, h, eps);                                            \
    }
#define BACKWARD(NAME, T)                                                                    \
    extern "C" __global__ void NAME(const T* x, const T* w, const float* inv, const T* dy,  \
                                    T* dx, int rows, int h) {                                \
        rms_backward<T>(x, w, inv, dy, dx, rows, h);                                         \
    }
FORWARD(runner_rms_forward_bf16, bf16_t)
FORWARD(runner_rms_forward_f32, float)
BACKWARD(runner_rms_backward_bf16, bf16_t)
BACKWARD(runner_rms_backward_f32, float)
