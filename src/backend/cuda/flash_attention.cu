// Flash attention (FlashAttention-2 scheme) for bf16 operands with f32 accumulation on tensor
// cores (mma.sync m16n8k16, sm_80 and newer), compiled at run time by NVRTC.
// No headers: bf16 values travel as raw 16-bit words, conversions and matrix ops are inline PTX.
//
// Layout: q [B, H, T, D], k and v [B, KVH, S, D], each addressed by (batch, head, row) strides in
// elements with the last axis contiguous (16-byte aligned rows). Query head h reads KV head
// h / (H / KVH). Causal: query position p sees key c iff c <= p + offset (offset = S - T, the
// queries are the last T of the S positions). key_valid (optional, [B, S] i32): 0 = never attend.
// lse [B, H, T] f32 holds the natural-log sum of exp(scale * scores) per query row, +inf for rows
// that see no key (their output is 0).
//
// Reference: Dao, "FlashAttention-2" (2023), algorithms 1 and 2; PTX ISA, "Matrix fragments for
// mma.m16n8k16" and "ldmatrix".

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef long long i64;

#define INF __int_as_float(0x7f800000)

// Tile shapes per head size come from flash.rs as defines (FWD_ROW_TILES_D64, FWD_ROW_TILES_D128,
// BWD_KEYS_D64, BWD_KEYS_D128), with the launch sizes they imply.
#if !defined(FWD_THREADS) || !defined(FWD_ROW_TILES_D64) || !defined(FWD_ROW_TILES_D128) || \
    !defined(BWD_KEYS_D64) || !defined(BWD_KEYS_D128)
#error "compile through flash.rs, which defines the tile shapes"
#endif

#define BLOCK_ROWS 64
#define BLOCK_KEYS 64
#define THREADS FWD_THREADS  // the forward block: four warps of 16 rows (times MT) each
static_assert(THREADS == 4 * 32 && BLOCK_ROWS == 16 * (THREADS / 32), "forward block shape");

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float bf16_to_f32(bf16_t x) { return __uint_as_float(((u32)x) << 16); }

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
// Addresses are 32-bit shared-window byte addresses: per-lane parts fold into one register and
// tile offsets into the instruction's immediate, keeping the integer pipe free.
__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// p[0] += a, p[1] += b (8-byte aligned): one vector reduction on sm_90, two before it.
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.v2.f32.add [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// 2^x in one MUFU instruction (denormals flush to zero; 2^-inf = 0).
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// c[16x8] += a[16x16] b[16x8]
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The two n-tiles of one x4 B fragment (see load_b_nk / load_b_kn): c0 += a b[0..2], c1 += a b[2..4].
__device__ __forceinline__ void mma2(float* c0, float* c1, const u32* a, const u32* b) {
    mma(c0, a, b[0], b[1]);
    mma(c1, a, b[2], b[3]);
}

// A fragment (16x16, row-major source) at rows r0.., cols c0.. of a tile with leading dim ld.
__device__ __forceinline__ void load_a(u32* a, u32 tile, int ld, int r0, int c0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4(a, tile + 2 * ((r0 + (m & 1) * 8 + i) * ld + c0 + (m >> 1) * 8));
}

// A fragment of the transpose of a stored tile: A[r][c] = tile[c0 + c][r0 + r].
__device__ __forceinline__ void load_a_t(u32* a, u32 tile, int ld, int r0, int c0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4_t(a, tile + 2 * ((c0 + (m >> 1) * 8 + i) * ld + r0 + (m & 1) * 8));
}

// B fragments of two adjacent n-tiles where B[k][n] = tile[n0 + n][k0 + k] (keys as rows).
__device__ __forceinline__ void load_b_nk(u32* b, u32 tile, int ld, int n0, int k0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4(b, tile + 2 * ((n0 + (m >> 1) * 8 + i) * ld + k0 + (m & 1) * 8));
}

// B fragments of two adjacent n-tiles where B[k][n] = tile[k0 + k][n0 + n] (row-major k x n).
__device__ __forceinline__ void load_b_kn(u32* b, u32 tile, int ld, int k0, int n0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4_t(b, tile + 2 * ((k0 + (m & 1) * 8 + i) * ld + n0 + (m >> 1) * 8));
}

// 16 bytes global -> shared without passing through registers; zeros when !valid.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Double buffering: queues the next tile's copies (when there is one) into the other buffer,
// then waits until this tile's copies have landed for the whole block.
template <typename IssueNext>
__device__ __forceinline__ void advance_tile(bool has_next, IssueNext issue_next) {
    if (has_next) {
        issue_next();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
}

// Queues the copy of a ROWS x D tile (rows past `rows_here` zero) with cp.async, NT threads.
template <int D, int ROWS, int NT = THREADS, typename RowPtr>
__device__ __forceinline__ void load_tile_async(bf16_t* tile, int rows_here, RowPtr row_ptr) {
    const int LD = D + 8;
    const int vecs = D / 8;
#pragma unroll
    for (int idx = threadIdx.x; idx < ROWS * vecs; idx += NT) {
        int r = idx / vecs, c = (idx % vecs) * 8;
        bool valid = r < rows_here;
        cp_async16(tile + r * LD + c, valid ? row_ptr(r) + c : row_ptr(0), valid);
    }
}

// Forward. Grid: (ceil(rep * T / (64 * MT)), KVH, B). The rep query heads of one KV head are
// stacked as rows (row = head_in_group * T + position), so decoding (T = 1) still fills the tile.
// Each warp owns MT row tiles of 16: one K or V fragment read from shared memory feeds MT mma.
template <int D>
struct FwdShape {
    static constexpr int MT = D == 64 ? FWD_ROW_TILES_D64 : FWD_ROW_TILES_D128;
    static constexpr int ROWS = BLOCK_ROWS * MT;
};

template <int D>
__device__ void fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                    const bf16_t* __restrict__ v, bf16_t* __restrict__ o, float* __restrict__ lse,
                    const int* __restrict__ key_valid, int H, int KVH, int T, int S,
                    i64 qsb, i64 qsh, i64 qst, i64 ksb, i64 ksh, i64 kss, i64 vsb, i64 vsh, i64 vss,
                    i64 osb, i64 osh, i64 ost, float scale, int causal) {
    constexpr int MT = FwdShape<D>::MT;
    constexpr int ROWS = FwdShape<D>::ROWS;
    const int LD = D + 8;
    extern __shared__ uint4 smem_raw[];
    // Q, then two buffers of (K, V): the next tile streams in while this one is used.
    bf16_t* sQ = reinterpret_cast<bf16_t*>(smem_raw);
    bf16_t* sKV = sQ + ROWS * LD;
    int* sValid = reinterpret_cast<int*>(sKV + 4 * BLOCK_KEYS * LD);

    const int b = blockIdx.z, kvh = blockIdx.y;
    const int rep = H / KVH;
    const int rows_total = rep * T;
    const int row0 = blockIdx.x * ROWS;
    const int offset = S - T;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const float scale_log2 = scale * 1.4426950408889634f;

    const bf16_t* qb = q + b * qsb;
    load_tile_async<D, ROWS>(sQ, min(ROWS, rows_total - row0), [&](int r) {
        int row = row0 + r;
        return qb + (i64)(kvh * rep + row / T) * qsh + (i64)(row % T) * qst;
    });
    cp_async_commit();

    // Positions of this block's rows: the causal key range and where masking is needed.
    const int last_row = min(row0 + ROWS, rows_total) - 1;
    const bool spans = row0 / T != last_row / T;
    const int min_pos = spans ? 0 : row0 % T;
    const int max_pos = spans ? T - 1 : last_row % T;
    const int kv_end = causal ? min(S, max_pos + offset + 1) : S;

    // This thread's rows: tile mt, half hf (g or g + 8).
    int pos[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) pos[mt][hf] = (row0 + (warp * MT + mt) * 16 + g + 8 * hf) % T;

    const bf16_t* kb = k + b * ksb + kvh * ksh;
    const bf16_t* vb = v + b * vsb + kvh * vsh;
    auto issue = [&](int key0, int buf) {
        const int keys_here = min(BLOCK_KEYS, S - key0);
        bf16_t* dK = sKV + buf * 2 * BLOCK_KEYS * LD;
        load_tile_async<D, BLOCK_KEYS>(dK, keys_here, [&](int r) { return kb + (i64)(key0 + r) * kss; });
        load_tile_async<D, BLOCK_KEYS>(dK + BLOCK_KEYS * LD, keys_here,
                                       [&](int r) { return vb + (i64)(key0 + r) * vss; });
        cp_async_commit();
        if (threadIdx.x < BLOCK_KEYS) {
            int key = key0 + threadIdx.x;
            sValid[buf * BLOCK_KEYS + threadIdx.x] =
                key < S && (key_valid == 0 || key_valid[(i64)b * S + key] != 0);
        }
    };
    if (kv_end > 0) {
        issue(0, 0);
        cp_async_wait<1>();  // Q has landed; the first K/V tile may still be in flight
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
    u32 qa[MT][D / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++)
            load_a(qa[mt][kc], smem_addr(sQ), LD, (warp * MT + mt) * 16, kc * 16, lane);

    float acc[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < D / 8; i++) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
        m[mt][0] = m[mt][1] = -INF;
        l[mt][0] = l[mt][1] = 0.f;
    }

    for (int key0 = 0, buf = 0; key0 < kv_end; key0 += BLOCK_KEYS, buf ^= 1) {
        advance_tile(key0 + BLOCK_KEYS < kv_end, [&] { issue(key0 + BLOCK_KEYS, buf ^ 1); });
        const u32 sK = smem_addr(sKV) + buf * (2 * BLOCK_KEYS * LD * 2);
        const u32 sV = sK + BLOCK_KEYS * LD * 2;
        const int* tValid = sValid + buf * BLOCK_KEYS;

        float s[MT][8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < 8; nt++) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                u32 bf[4];
                load_b_nk(bf, sK, LD, nt * 8, kc * 16, lane);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma2(s[mt][nt], s[mt][nt + 1], qa[mt][kc], bf);
                }
            }
        }

        const bool need_mask = key0 + BLOCK_KEYS > S || key_valid != 0 ||
                               (causal && key0 + BLOCK_KEYS - 1 > min_pos + offset);
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int c = nt * 8 + 2 * t4 + (e & 1);
                        bool visible = tValid[c] && (!causal || key0 + c <= pos[mt][e >> 1] + offset);
                        if (!visible) s[mt][nt][e] = -INF;
                    }
        }

        // Online softmax. The rows' reductions are trees and run side by side (then one round
        // of shuffles for all rows), so their latencies overlap instead of adding up.
        float mx[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                float t[8];
#pragma unroll
                for (int nt = 0; nt < 8; nt++) t[nt] = fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]);
#pragma unroll
                for (int w = 4; w > 0; w >>= 1)
#pragma unroll
                    for (int i = 0; i < w; i++) t[i] = fmaxf(t[i], t[i + w]);
                mx[mt][hf] = t[0];
            }
#pragma unroll
        for (int sh = 1; sh < 4; sh <<= 1)
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++)
                    mx[mt][hf] = fmaxf(mx[mt][hf], __shfl_xor_sync(0xffffffff, mx[mt][hf], sh));
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const float m_new = fmaxf(m[mt][hf], mx[mt][hf] * scale_log2);
                // A row that has seen no visible key yet keeps a zero base: exp2(-inf - 0) = 0.
                const float base = m_new == -INF ? 0.f : m_new;
                const float alpha = exp2_fast(m[mt][hf] - base);
                m[mt][hf] = m_new;
                float t[8];
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    s[mt][nt][2 * hf] = exp2_fast(fmaf(s[mt][nt][2 * hf], scale_log2, -base));
                    s[mt][nt][2 * hf + 1] = exp2_fast(fmaf(s[mt][nt][2 * hf + 1], scale_log2, -base));
                    t[nt] = s[mt][nt][2 * hf] + s[mt][nt][2 * hf + 1];
                }
#pragma unroll
                for (int w = 4; w > 0; w >>= 1)
#pragma unroll
                    for (int i = 0; i < w; i++) t[i] += t[i + w];
                l[mt][hf] = fmaf(l[mt][hf], alpha, t[0]);
#pragma unroll
                for (int i = 0; i < D / 8; i++) {
                    acc[mt][i][2 * hf] *= alpha;
                    acc[mt][i][2 * hf + 1] *= alpha;
                }
            }
        }
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                pa[mt][0] = pack_bf16(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                pa[mt][1] = pack_bf16(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                pa[mt][2] = pack_bf16(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                pa[mt][3] = pack_bf16(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
            }
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                u32 bf[4];
                load_b_kn(bf, sV, LD, kc * 16, dt * 8, lane);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma2(acc[mt][dt], acc[mt][dt + 1], pa[mt], bf);
                }
            }
        }
        __syncthreads();  // this buffer is refilled by the next iteration's prefetch
    }

#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float lsum = l[mt][hf];
            lsum += __shfl_xor_sync(0xffffffff, lsum, 1);
            lsum += __shfl_xor_sync(0xffffffff, lsum, 2);
            const int row = row0 + (warp * MT + mt) * 16 + g + 8 * hf;
            if (row >= rows_total) continue;
            const int h = kvh * rep + row / T, p = row % T;
            const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
            bf16_t* orow = o + b * osb + (i64)h * osh + (i64)p * ost;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                *reinterpret_cast<u32*>(orow + dt * 8 + 2 * t4) =
                    pack_bf16(acc[mt][dt][2 * hf] * inv, acc[mt][dt][2 * hf + 1] * inv);
            }
            if (t4 == 0) {
                lse[((i64)b * H + h) * T + p] =
                    lsum > 0.f ? (m[mt][hf] + log2f(lsum)) * 0.6931471805599453f : INF;
            }
        }
    }
}

// Backward. Grid: (ceil(S / KB), H, B), KB / 16 warps; each block owns KB keys of the KV head
// that query head blockIdx.y reads and sweeps that query head's tiles of 64 (the next tile
// streams in with cp.async while this one is used). It keeps its share of dK and dV in
// registers and adds it to the f32 buffers dk_acc, dv_acc [B, KVH, S, D] (the rep query heads of
// a KV head meet there), and adds dQ (scaled, summed over its KB keys) into dq_acc [B, H, T, D];
// all with atomics, so the more keys a block owns, the fewer dQ atomics per product.
// delta [B, H, T] = rowsum(dO * O).
template <int D>
struct BwdShape {
    static constexpr int KB = D == 64 ? BWD_KEYS_D64 : BWD_KEYS_D128;
    static constexpr int WARPS = KB / 16;
    static constexpr int THREADS_ = WARPS * 32;
};

template <int D>
__device__ void bwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                    const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    const int* __restrict__ key_valid, float* __restrict__ dq_acc,
                    float* __restrict__ dk_acc, float* __restrict__ dv_acc, int H, int KVH, int T, int S,
                    i64 qsb, i64 qsh, i64 qst, i64 ksb, i64 ksh, i64 kss, i64 vsb, i64 vsh, i64 vss,
                    i64 dsb, i64 dsh, i64 dst, float scale, int causal) {
    constexpr int KB = BwdShape<D>::KB;
    constexpr int NT = BwdShape<D>::THREADS_;
    constexpr int QB = BLOCK_ROWS;
    constexpr int LD = D + 8;
    constexpr int LDS = QB + 8;
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ uint4 smem_raw[];
    bf16_t* sK = reinterpret_cast<bf16_t*>(smem_raw);
    bf16_t* sV = sK + KB * LD;
    bf16_t* sQdO = sV + KB * LD;  // two buffers of (Q, dO), each QB x LD
    bf16_t* sDS = sQdO + 4 * QB * LD;  // dS^T: [key][query]
    float* sLse = reinterpret_cast<float*>(sDS + KB * LDS);  // two buffers, times log2(e)
    float* sDelta = sLse + 2 * QB;
    int* sValid = reinterpret_cast<int*>(sDelta + 2 * QB);

    const int b = blockIdx.z, h = blockIdx.y;
    const int rep = H / KVH;
    const int kvh = h / rep;
    const int key0 = blockIdx.x * KB;
    const int offset = S - T;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const float scale_log2 = scale * LOG2E;

    const int keys_here = min(KB, S - key0);
    const bf16_t* kb = k + b * ksb + kvh * ksh;
    const bf16_t* vb = v + b * vsb + kvh * vsh;
    load_tile_async<D, KB, NT>(sK, keys_here, [&](int r) { return kb + (i64)(key0 + r) * kss; });
    load_tile_async<D, KB, NT>(sV, keys_here, [&](int r) { return vb + (i64)(key0 + r) * vss; });
    cp_async_commit();
    if (threadIdx.x < KB) {
        int key = key0 + threadIdx.x;
        sValid[threadIdx.x] = key < S && (key_valid == 0 || key_valid[(i64)b * S + key] != 0);
    }

    const bf16_t* qh = q + b * qsb + (i64)h * qsh;
    const bf16_t* dh = dout + b * dsb + (i64)h * dsh;
    const i64 stat0 = ((i64)b * H + h) * T;
    auto issue = [&](int q0, int buf) {
        const int rows_here = min(QB, T - q0);
        bf16_t* dQ = sQdO + buf * 2 * QB * LD;
        load_tile_async<D, QB, NT>(dQ, rows_here, [&](int r) { return qh + (i64)(q0 + r) * qst; });
        load_tile_async<D, QB, NT>(dQ + QB * LD, rows_here,
                                   [&](int r) { return dh + (i64)(q0 + r) * dst; });
        cp_async_commit();
        if (threadIdx.x < QB) {
            int r = threadIdx.x;
            sLse[buf * QB + r] = r < rows_here ? lse[stat0 + q0 + r] * LOG2E : INF;
            sDelta[buf * QB + r] = r < rows_here ? delta[stat0 + q0 + r] : 0.f;
        }
    };

    float dK[D / 8][4], dV[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) dK[i][e] = dV[i][e] = 0.f;

    const int kA = warp * 16 + g;  // this thread's key rows (kA, kA + 8) within the block
    // The first query position that sees any key of this block.
    const int q_first = ((causal ? max(0, key0 - offset) : 0) / QB) * QB;
    bool valid_lo = false, valid_hi = false;  // this thread's two keys, read after the first barrier
    if (q_first < T) issue(q_first, 0);
    for (int q0 = q_first, buf = 0; q0 < T; q0 += QB, buf ^= 1) {
        advance_tile(q0 + QB < T, [&] { issue(q0 + QB, buf ^ 1); });
        const u32 sQ = smem_addr(sQdO) + buf * (2 * QB * LD * 2);
        const u32 sdO = sQ + QB * LD * 2;
        const u32 aK = smem_addr(sK), aV = smem_addr(sV), aDS = smem_addr(sDS);
        const float* tLse = sLse + buf * QB;
        const float* tDelta = sDelta + buf * QB;
        if (q0 == q_first) {
            valid_lo = sValid[kA];
            valid_hi = sValid[kA + 8];
        }

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x QB queries.
        float st[8][4], dpt[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
            u32 ka[4], va[4];
            load_a(ka, aK, LD, warp * 16, kc * 16, lane);
            load_a(va, aV, LD, warp * 16, kc * 16, lane);
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                u32 bq[4], bd[4];
                load_b_nk(bq, sQ, LD, nt * 8, kc * 16, lane);
                load_b_nk(bd, sdO, LD, nt * 8, kc * 16, lane);
                mma2(st[nt], st[nt + 1], ka, bq);
                mma2(dpt[nt], dpt[nt + 1], va, bd);
            }
        }
        // P^T and dS^T = P^T * (dP^T - delta); masking only on tiles that need it.
        const bool need_mask = key_valid != 0 || q0 + QB > T || key0 + KB > S ||
                               (causal && key0 + warp * 16 + 15 > q0 + offset);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            // This thread's two query columns of the n-tile: one 8-byte load each.
            const float2 lse2 = *reinterpret_cast<const float2*>(tLse + nt * 8 + 2 * t4);
            const float2 del2 = *reinterpret_cast<const float2*>(tDelta + nt * 8 + 2 * t4);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qc = nt * 8 + 2 * t4 + (e & 1);
                float p = exp2_fast(fmaf(st[nt][e], scale_log2, -((e & 1) ? lse2.y : lse2.x)));
                if (need_mask) {
                    int key_r = kA + (e >= 2 ? 8 : 0);
                    bool visible = (e >= 2 ? valid_hi : valid_lo) && q0 + qc < T &&
                                   (!causal || key0 + key_r <= q0 + qc + offset);
                    p = visible ? p : 0.f;
                }
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - ((e & 1) ? del2.y : del2.x));
            }
        }
        // dV += P^T dO, dK += dS^T Q (scaled at the end).
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            u32 pa[4], da[4];
            pa[0] = pack_bf16(st[2 * kc][0], st[2 * kc][1]);
            pa[1] = pack_bf16(st[2 * kc][2], st[2 * kc][3]);
            pa[2] = pack_bf16(st[2 * kc + 1][0], st[2 * kc + 1][1]);
            pa[3] = pack_bf16(st[2 * kc + 1][2], st[2 * kc + 1][3]);
            da[0] = pack_bf16(dpt[2 * kc][0], dpt[2 * kc][1]);
            da[1] = pack_bf16(dpt[2 * kc][2], dpt[2 * kc][3]);
            da[2] = pack_bf16(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]);
            da[3] = pack_bf16(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3]);
            // dS^T to shared memory for the dQ product below.
            *reinterpret_cast<u32*>(sDS + kA * LDS + kc * 16 + 2 * t4) = da[0];
            *reinterpret_cast<u32*>(sDS + (kA + 8) * LDS + kc * 16 + 2 * t4) = da[1];
            *reinterpret_cast<u32*>(sDS + kA * LDS + kc * 16 + 8 + 2 * t4) = da[2];
            *reinterpret_cast<u32*>(sDS + (kA + 8) * LDS + kc * 16 + 8 + 2 * t4) = da[3];
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                u32 bo[4], bq[4];
                load_b_kn(bo, sdO, LD, kc * 16, dt * 8, lane);
                load_b_kn(bq, sQ, LD, kc * 16, dt * 8, lane);
                mma2(dV[dt], dV[dt + 1], pa, bo);
                mma2(dK[dt], dK[dt + 1], da, bq);
            }
        }
        __syncthreads();
        // dQ = dS K over the block's KB keys: warp w takes query rows 16 (w % 4) and the
        // (w / 4)-th of WARPS / 4 column groups.
        {
            constexpr int GROUPS = BwdShape<D>::WARPS / 4;
            constexpr int COLS = D / GROUPS;
            const int qt = warp & 3, c0 = (warp >> 2) * COLS;
            float dq[COLS / 8][4];
#pragma unroll
            for (int i = 0; i < COLS / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < KB / 16; kc++) {
                u32 a[4];
                load_a_t(a, aDS, LDS, qt * 16, kc * 16, lane);
#pragma unroll
                for (int dt = 0; dt < COLS / 8; dt += 2) {
                    u32 bk[4];
                    load_b_kn(bk, aK, LD, kc * 16, c0 + dt * 8, lane);
                    mma2(dq[dt], dq[dt + 1], a, bk);
                }
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int qr = q0 + qt * 16 + g + half * 8;
                if (qr >= T) continue;
                float* dst_row = dq_acc + (stat0 + qr) * D + c0;
#pragma unroll
                for (int dt = 0; dt < COLS / 8; dt++) {
                    red_add2(dst_row + dt * 8 + 2 * t4, dq[dt][2 * half] * scale,
                             dq[dt][2 * half + 1] * scale);
                }
            }
        }
        __syncthreads();  // this Q/dO buffer and dS^T are refilled next
    }
    cp_async_wait<0>();  // K/V copies of a block no query reaches are still owned by it

    const i64 kv0 = ((i64)b * KVH + kvh) * S;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int key = key0 + kA + half * 8;
        if (key >= S) continue;
        float* dk_row = dk_acc + (kv0 + key) * D;
        float* dv_row = dv_acc + (kv0 + key) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            red_add2(dk_row + dt * 8 + 2 * t4, dK[dt][2 * half] * scale, dK[dt][2 * half + 1] * scale);
            red_add2(dv_row + dt * 8 + 2 * t4, dV[dt][2 * half], dV[dt][2 * half + 1]);
        }
    }
}

#define FWD_ENTRY(DIM)                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS) runner_flash_fwd_d##DIM(              \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, float* lse,               \
        const int* key_valid, int H, int KVH, int T, int S, i64 qsb, i64 qsh, i64 qst, i64 ksb, \
        i64 ksh, i64 kss, i64 vsb, i64 vsh, i64 vss, i64 osb, i64 osh, i64 ost, float scale,    \
        int causal) {                                                                           \
        fwd<DIM>(q, k, v, o, lse, key_valid, H, KVH, T, S, qsb, qsh, qst, ksb, ksh, kss, vsb,   \
                 vsh, vss, osb, osh, ost, scale, causal);                                       \
    }

#define BWD_ENTRY(DIM)                                                                          \
    extern "C" __global__ void __launch_bounds__(BwdShape<DIM>::THREADS_)                       \
        runner_flash_bwd_d##DIM(const bf16_t* q, const bf16_t* k, const bf16_t* v,              \
                                const bf16_t* dout, const float* lse, const float* delta,       \
                                const int* key_valid, float* dq_acc, float* dk, float* dv, int H,\
                                int KVH, int T, int S, i64 qsb, i64 qsh, i64 qst, i64 ksb,      \
                                i64 ksh, i64 kss, i64 vsb, i64 vsh, i64 vss, i64 dsb, i64 dsh,  \
                                i64 dst, float scale, int causal) {                             \
        bwd<DIM>(q, k, v, dout, lse, delta, key_valid, dq_acc, dk, dv, H, KVH, T, S, qsb, qsh,  \
                 qst, ksb, ksh, kss, vsb, vsh, vss, dsb, dsh, dst, scale, causal);              \
    }

FWD_ENTRY(64)
FWD_ENTRY(128)
BWD_ENTRY(64)
BWD_ENTRY(128)
