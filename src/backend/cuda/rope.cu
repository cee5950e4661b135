// Rotary position embedding (transformers' `apply_rotary_pos_emb`: x cos + rotate_half(x) sin,
// rotate_half(x) = [-x2, x1]) and its gradient, for x [b, h, t, d] (bf16 or f32) read and
// written through strides, cos and sin [cb, t, d] (cb = 1 or b) read through strides.
// One thread per pair (j, j + d/2) of one row, f32 arithmetic, one rounding per output:
//   forward:  y1 = x1 c1 - x2 s1;   y2 = x2 c2 + x1 s2
//   backward: dx1 = dy1 c1 + dy2 s2;   dx2 = dy2 c2 - dy1 s1
// bf16.cuh comes first (types and conversions).
// Compiled at run time by NVRTC (src/backend/cuda/rope.rs).


// Strides in elements: x (xb, xh, xt), y (yb, yh, yt), cos/sin (cb, ct); last axes contiguous.
template <typename T>
__device__ __forceinline__ void rope(const T* x, const T* cs, const T* sn, T* y, int b, int h,
                                     int t, int d, i64 xb, i64 xh, i64 xt, i64 yb, i64 yh, i64 yt,
                                     i64 cb, i64 ct, int backward) {
    const int half = d / 2;
    const i64 total = (i64)b * h * t * half;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        const int j = (int)(i % half);
        i64 rest = i / half;
        const int tt = (int)(rest % t);
        rest /= t;
        const int hh = (int)(rest % h);
        const int bb = (int)(rest / h);
        const T* xr = x + bb * xb + hh * xh + tt * xt;
        T* yr = y + bb * yb + hh * yh + tt * yt;
        const i64 c0 = (cb == 0 ? 0 : bb * cb) + tt * ct;
        const float c1 = to_f32(cs[c0 + j]), c2 = to_f32(cs[c0 + j + half]);
        const float s1 = to_f32(sn[c0 + j]), s2 = to_f32(sn[c0 + j + half]);
        const float x1 = to_f32(xr[j]), x2 = to_f32(xr[j + half]);
        float y1, y2;
        if (backward) {
            y1 = x1 * c1 + x2 * s2;
            y2 = x2 * c2 - x1 * s1;
        } else {
            y1 = x1 * c1 - x2 * s1;
            y2 = x2 * c2 + x1 * s2;
        }
        yr[j] = round_to(y1, T());
        yr[j + half] = round_to(y2, T());
    }
}

#define ROPE(NAME, T)                                                                           \
    extern "C" __global__ void NAME(const T* x, const T* cs, const T* sn, T* y, int b, int h,   \
                                    int t, int d, i64 xb, i64 xh, i64 xt, i64 yb, i64 yh,       \
                                    i64 yt, i64 cb, i64 ct, int backward) {                     \
        rope<T>(x, cs, sn, y, b, h, t, d, xb, xh, xt, yb, yh, yt, cb, ct, backward);            \
    }
ROPE(runner_rope_bf16, bf16_t)
ROPE(runner_rope_f32, float)
