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

#define BLOCK_ROWS 64
#define BLOCK_KEYS 64
#define THREADS 128

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
__device__ __forceinline__ void ldsm_x4(u32* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_t(u32* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] b[16x8]
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragment (16x16, row-major source) at rows r0.., cols c0.. of a tile with leading dim ld.
__device__ __forceinline__ void load_a(u32* a, const bf16_t* tile, int ld, int r0, int c0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4(a, tile + (r0 + (m & 1) * 8 + i) * ld + c0 + (m >> 1) * 8);
}

// A fragment of the transpose of a stored tile: A[r][c] = tile[c0 + c][r0 + r].
__device__ __forceinline__ void load_a_t(u32* a, const bf16_t* tile, int ld, int r0, int c0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4_t(a, tile + (c0 + (m >> 1) * 8 + i) * ld + r0 + (m & 1) * 8);
}

// B fragments of two adjacent n-tiles where B[k][n] = tile[n0 + n][k0 + k] (keys as rows).
__device__ __forceinline__ void load_b_nk(u32* b, const bf16_t* tile, int ld, int n0, int k0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4(b, tile + (n0 + (m >> 1) * 8 + i) * ld + k0 + (m & 1) * 8);
}

// B fragments of two adjacent n-tiles where B[k][n] = tile[k0 + k][n0 + n] (row-major k x n).
__device__ __forceinline__ void load_b_kn(u32* b, const bf16_t* tile, int ld, int k0, int n0, int lane) {
    int m = lane >> 3, i = lane & 7;
    ldsm_x4_t(b, tile + (k0 + (m & 1) * 8 + i) * ld + n0 + (m >> 1) * 8);
}

// 16 bytes global -> shared without passing through registers; zeros when !valid.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Queues the copy of a 64 x D tile (rows past `rows_here` zero) with cp.async.
template <int D, typename RowPtr>
__device__ __forceinline__ void load_tile_async(bf16_t* tile, int rows_here, RowPtr row_ptr) {
    const int LD = D + 8;
    const int vecs = D / 8;
    for (int idx = threadIdx.x; idx < BLOCK_ROWS * vecs; idx += THREADS) {
        int r = idx / vecs, c = (idx % vecs) * 8;
        bool valid = r < rows_here;
        cp_async16(tile + r * LD + c, valid ? row_ptr(r) + c : row_ptr(0), valid);
    }
}

// Copies rows [row0, row0 + 64) x D of a strided bf16 tensor into shared memory (zeros past
// `rows`); `row_ptr(r)` gives the global address of row r.
template <int D, typename RowPtr>
__device__ __forceinline__ void load_tile(bf16_t* tile, int rows_here, RowPtr row_ptr) {
    const int LD = D + 8;
    const int vecs = D / 8;
    for (int idx = threadIdx.x; idx < BLOCK_ROWS * vecs; idx += THREADS) {
        int r = idx / vecs, c = (idx % vecs) * 8;
        uint4 val = {0u, 0u, 0u, 0u};
        if (r < rows_here) val = *reinterpret_cast<const uint4*>(row_ptr(r) + c);
        *reinterpret_cast<uint4*>(tile + r * LD + c) = val;
    }
}

// Forward. Grid: (ceil(rep * T / 64), KVH, B). The rep query heads of one KV head are stacked
// as rows (row = head_in_group * T + position), so decoding (T = 1) still fills the tile.
template <int D>
__device__ void fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                    const bf16_t* __restrict__ v, bf16_t* __restrict__ o, float* __restrict__ lse,
                    const int* __restrict__ key_valid, int H, int KVH, int T, int S,
                    i64 qsb, i64 qsh, i64 qst, i64 ksb, i64 ksh, i64 kss, i64 vsb, i64 vsh, i64 vss,
                    i64 osb, i64 osh, i64 ost, float scale, int causal) {
    const int LD = D + 8;
    extern __shared__ uint4 smem_raw[];
    // Q, then two buffers of (K, V): the next tile streams in while this one is used.
    bf16_t* sQ = reinterpret_cast<bf16_t*>(smem_raw);
    bf16_t* sKV = sQ + BLOCK_ROWS * LD;
    int* sValid = reinterpret_cast<int*>(sKV + 4 * BLOCK_KEYS * LD);

    const int b = blockIdx.z, kvh = blockIdx.y;
    const int rep = H / KVH;
    const int rows_total = rep * T;
    const int row0 = blockIdx.x * BLOCK_ROWS;
    const int offset = S - T;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const float scale_log2 = scale * 1.4426950408889634f;

    const bf16_t* qb = q + b * qsb;
    load_tile<D>(sQ, min(BLOCK_ROWS, rows_total - row0), [&](int r) {
        int row = row0 + r;
        return qb + (i64)(kvh * rep + row / T) * qsh + (i64)(row % T) * qst;
    });

    // Positions of this block's rows: the causal key range and where masking is needed.
    const int last_row = min(row0 + BLOCK_ROWS, rows_total) - 1;
    const bool spans = row0 / T != last_row / T;
    const int min_pos = spans ? 0 : row0 % T;
    const int max_pos = spans ? T - 1 : last_row % T;
    const int kv_end = causal ? min(S, max_pos + offset + 1) : S;

    const int rA = row0 + warp * 16 + g, rB = rA + 8;
    const int posA = rA % T, posB = rB % T;

    __syncthreads();
    u32 qa[D / 16][4];
#pragma unroll
    for (int kc = 0; kc < D / 16; kc++) load_a(qa[kc], sQ, LD, warp * 16, kc * 16, lane);

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float mA = -INF, mB = -INF, lA = 0.f, lB = 0.f;

    const bf16_t* kb = k + b * ksb + kvh * ksh;
    const bf16_t* vb = v + b * vsb + kvh * vsh;
    auto issue = [&](int key0, int buf) {
        const int keys_here = min(BLOCK_KEYS, S - key0);
        bf16_t* dK = sKV + buf * 2 * BLOCK_KEYS * LD;
        load_tile_async<D>(dK, keys_here, [&](int r) { return kb + (i64)(key0 + r) * kss; });
        load_tile_async<D>(dK + BLOCK_KEYS * LD, keys_here,
                           [&](int r) { return vb + (i64)(key0 + r) * vss; });
        cp_async_commit();
        if (threadIdx.x < BLOCK_KEYS) {
            int key = key0 + threadIdx.x;
            sValid[buf * BLOCK_KEYS + threadIdx.x] =
                key < S && (key_valid == 0 || key_valid[(i64)b * S + key] != 0);
        }
    };
    if (kv_end > 0) issue(0, 0);
    for (int key0 = 0, buf = 0; key0 < kv_end; key0 += BLOCK_KEYS, buf ^= 1) {
        if (key0 + BLOCK_KEYS < kv_end) {
            issue(key0 + BLOCK_KEYS, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16_t* sK = sKV + buf * 2 * BLOCK_KEYS * LD;
        const bf16_t* sV = sK + BLOCK_KEYS * LD;
        const int* tValid = sValid + buf * BLOCK_KEYS;

        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                u32 bf[4];
                load_b_nk(bf, sK, LD, nt * 8, kc * 16, lane);
                mma(s[nt], qa[kc], bf[0], bf[1]);
                mma(s[nt + 1], qa[kc], bf[2], bf[3]);
            }
        }

        const bool need_mask = key0 + BLOCK_KEYS > S || key_valid != 0 ||
                               (causal && key0 + BLOCK_KEYS - 1 > min_pos + offset);
        if (need_mask) {
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int c = nt * 8 + 2 * t4 + (e & 1);
                    int pos = e < 2 ? posA : posB;
                    bool visible = tValid[c] && (!causal || key0 + c <= pos + offset);
                    if (!visible) s[nt][e] = -INF;
                }
            }
        }

        float maxA = -INF, maxB = -INF;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            maxA = fmaxf(maxA, fmaxf(s[nt][0], s[nt][1]));
            maxB = fmaxf(maxB, fmaxf(s[nt][2], s[nt][3]));
        }
#pragma unroll
        for (int sh = 1; sh < 4; sh <<= 1) {
            maxA = fmaxf(maxA, __shfl_xor_sync(0xffffffff, maxA, sh));
            maxB = fmaxf(maxB, __shfl_xor_sync(0xffffffff, maxB, sh));
        }
        const float newA = fmaxf(mA, maxA * scale_log2), newB = fmaxf(mB, maxB * scale_log2);
        // A row that has seen no visible key yet keeps a zero base: exp2(-inf - 0) = 0, no NaN.
        const float baseA = newA == -INF ? 0.f : newA;
        const float baseB = newB == -INF ? 0.f : newB;
        const float alphaA = exp2f(mA - baseA), alphaB = exp2f(mB - baseB);
        mA = newA;
        mB = newB;
        float sumA = 0.f, sumB = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] * scale_log2 - baseA);
            s[nt][1] = exp2f(s[nt][1] * scale_log2 - baseA);
            s[nt][2] = exp2f(s[nt][2] * scale_log2 - baseB);
            s[nt][3] = exp2f(s[nt][3] * scale_log2 - baseB);
            sumA += s[nt][0] + s[nt][1];
            sumB += s[nt][2] + s[nt][3];
        }
        lA = lA * alphaA + sumA;
        lB = lB * alphaB + sumB;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            acc[i][0] *= alphaA;
            acc[i][1] *= alphaA;
            acc[i][2] *= alphaB;
            acc[i][3] *= alphaB;
        }
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            u32 pa[4];
            pa[0] = pack_bf16(s[2 * kc][0], s[2 * kc][1]);
            pa[1] = pack_bf16(s[2 * kc][2], s[2 * kc][3]);
            pa[2] = pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            pa[3] = pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                u32 bf[4];
                load_b_kn(bf, sV, LD, kc * 16, dt * 8, lane);
                mma(acc[dt], pa, bf[0], bf[1]);
                mma(acc[dt + 1], pa, bf[2], bf[3]);
            }
        }
        __syncthreads();  // this buffer is refilled by the next iteration's prefetch
    }

#pragma unroll
    for (int sh = 1; sh < 4; sh <<= 1) {
        lA += __shfl_xor_sync(0xffffffff, lA, sh);
        lB += __shfl_xor_sync(0xffffffff, lB, sh);
    }
    const float invA = lA > 0.f ? 1.f / lA : 0.f, invB = lB > 0.f ? 1.f / lB : 0.f;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = half == 0 ? rA : rB;
        if (row >= rows_total) continue;
        int h = kvh * rep + row / T, pos = row % T;
        float inv = half == 0 ? invA : invB;
        bf16_t* orow = o + b * osb + (i64)h * osh + (i64)pos * ost;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<u32*>(orow + dt * 8 + 2 * t4) =
                pack_bf16(acc[dt][2 * half] * inv, acc[dt][2 * half + 1] * inv);
        }
        if (t4 == 0) {
            float l = half == 0 ? lA : lB, m = half == 0 ? mA : mB;
            lse[((i64)b * H + h) * T + pos] =
                l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : INF;
        }
    }
}

// Backward. Grid: (ceil(S / 64), H, B); each block owns 64 keys of the KV head that query head
// blockIdx.y reads, sweeps that query head's tiles, keeps its share of dK and dV in registers
// and adds it to the f32 buffers dk_acc, dv_acc [B, KVH, S, D] (the rep query heads of a KV
// head meet there), and adds dQ (scaled) into dq_acc [B, H, T, D]; all with atomics.
// delta [B, H, T] = rowsum(dO * O).
template <int D>
__device__ void bwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                    const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    const int* __restrict__ key_valid, float* __restrict__ dq_acc,
                    float* __restrict__ dk_acc, float* __restrict__ dv_acc, int H, int KVH, int T, int S,
                    i64 qsb, i64 qsh, i64 qst, i64 ksb, i64 ksh, i64 kss, i64 vsb, i64 vsh, i64 vss,
                    i64 dsb, i64 dsh, i64 dst, float scale, int causal) {
    const int LD = D + 8;
    const int LDS = BLOCK_ROWS + 8;
    extern __shared__ uint4 smem_raw[];
    bf16_t* sK = reinterpret_cast<bf16_t*>(smem_raw);
    bf16_t* sV = sK + BLOCK_KEYS * LD;
    bf16_t* sQ = sV + BLOCK_KEYS * LD;
    bf16_t* sdO = sQ + BLOCK_ROWS * LD;
    bf16_t* sDS = sdO + BLOCK_ROWS * LD;  // dS^T: [key][query]
    float* sLse = reinterpret_cast<float*>(sDS + BLOCK_KEYS * LDS);
    float* sDelta = sLse + BLOCK_ROWS;
    int* sValid = reinterpret_cast<int*>(sDelta + BLOCK_ROWS);

    const int b = blockIdx.z, h = blockIdx.y;
    const int rep = H / KVH;
    const int kvh = h / rep;
    const int key0 = blockIdx.x * BLOCK_KEYS;
    const int offset = S - T;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const float scale_log2 = scale * 1.4426950408889634f;

    const int keys_here = min(BLOCK_KEYS, S - key0);
    const bf16_t* kb = k + b * ksb + kvh * ksh;
    const bf16_t* vb = v + b * vsb + kvh * vsh;
    load_tile<D>(sK, keys_here, [&](int r) { return kb + (i64)(key0 + r) * kss; });
    load_tile<D>(sV, keys_here, [&](int r) { return vb + (i64)(key0 + r) * vss; });
    if (threadIdx.x < BLOCK_KEYS) {
        int key = key0 + threadIdx.x;
        sValid[threadIdx.x] = key < S && (key_valid == 0 || key_valid[(i64)b * S + key] != 0);
    }

    float dK[D / 8][4], dV[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) dK[i][e] = dV[i][e] = 0.f;

    const int kA = warp * 16 + g;  // this thread's key rows (kA, kA + 8) within the block
    // The first query position that sees any key of this block.
    const int q_start = causal ? max(0, key0 - offset) : 0;

    {
        const bf16_t* qh = q + b * qsb + (i64)h * qsh;
        const bf16_t* dh = dout + b * dsb + (i64)h * dsh;
        const i64 stat0 = ((i64)b * H + h) * T;
        for (int q0 = (q_start / BLOCK_ROWS) * BLOCK_ROWS; q0 < T; q0 += BLOCK_ROWS) {
            const int rows_here = min(BLOCK_ROWS, T - q0);
            __syncthreads();
            load_tile<D>(sQ, rows_here, [&](int r) { return qh + (i64)(q0 + r) * qst; });
            load_tile<D>(sdO, rows_here, [&](int r) { return dh + (i64)(q0 + r) * dst; });
            if (threadIdx.x < BLOCK_ROWS) {
                int r = threadIdx.x;
                sLse[r] = r < rows_here ? lse[stat0 + q0 + r] : INF;
                sDelta[r] = r < rows_here ? delta[stat0 + q0 + r] : 0.f;
            }
            __syncthreads();

            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
            float st[8][4], dpt[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) {
                u32 ka[4], va[4];
                load_a(ka, sK, LD, warp * 16, kc * 16, lane);
                load_a(va, sV, LD, warp * 16, kc * 16, lane);
#pragma unroll
                for (int nt = 0; nt < 8; nt += 2) {
                    u32 bq[4], bd[4];
                    load_b_nk(bq, sQ, LD, nt * 8, kc * 16, lane);
                    load_b_nk(bd, sdO, LD, nt * 8, kc * 16, lane);
                    mma(st[nt], ka, bq[0], bq[1]);
                    mma(st[nt + 1], ka, bq[2], bq[3]);
                    mma(dpt[nt], va, bd[0], bd[1]);
                    mma(dpt[nt + 1], va, bd[2], bd[3]);
                }
            }
            // P^T and dS^T = P^T * (dP^T - delta), zero where masked.
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key_r = kA + (e >= 2 ? 8 : 0);
                    int qc = nt * 8 + 2 * t4 + (e & 1);
                    bool visible = sValid[key_r] && q0 + qc < T &&
                                   (!causal || key0 + key_r <= q0 + qc + offset);
                    float p = visible ? exp2f(st[nt][e] * scale_log2 - sLse[qc] * 1.4426950408889634f)
                                      : 0.f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - sDelta[qc]);
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
                    mma(dV[dt], pa, bo[0], bo[1]);
                    mma(dV[dt + 1], pa, bo[2], bo[3]);
                    mma(dK[dt], da, bq[0], bq[1]);
                    mma(dK[dt + 1], da, bq[2], bq[3]);
                }
            }
            __syncthreads();
            // dQ[16 queries of this warp] = dS K over the block's 64 keys.
            float dq[D / 8][4];
#pragma unroll
            for (int i = 0; i < D / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < 4; kc++) {
                u32 a[4];
                load_a_t(a, sDS, LDS, warp * 16, kc * 16, lane);
#pragma unroll
                for (int dt = 0; dt < D / 8; dt += 2) {
                    u32 bk[4];
                    load_b_kn(bk, sK, LD, kc * 16, dt * 8, lane);
                    mma(dq[dt], a, bk[0], bk[1]);
                    mma(dq[dt + 1], a, bk[2], bk[3]);
                }
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int qr = q0 + warp * 16 + g + half * 8;
                if (qr >= T) continue;
                float* dst_row = dq_acc + (stat0 + qr) * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    atomicAdd(dst_row + dt * 8 + 2 * t4, dq[dt][2 * half] * scale);
                    atomicAdd(dst_row + dt * 8 + 2 * t4 + 1, dq[dt][2 * half + 1] * scale);
                }
            }
        }
    }

    const i64 kv0 = ((i64)b * KVH + kvh) * S;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int key = key0 + kA + half * 8;
        if (key >= S) continue;
        float* dk_row = dk_acc + (kv0 + key) * D;
        float* dv_row = dv_acc + (kv0 + key) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            atomicAdd(dk_row + dt * 8 + 2 * t4, dK[dt][2 * half] * scale);
            atomicAdd(dk_row + dt * 8 + 2 * t4 + 1, dK[dt][2 * half + 1] * scale);
            atomicAdd(dv_row + dt * 8 + 2 * t4, dV[dt][2 * half]);
            atomicAdd(dv_row + dt * 8 + 2 * t4 + 1, dV[dt][2 * half + 1]);
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
    extern "C" __global__ void __launch_bounds__(THREADS) runner_flash_bwd_d##DIM(              \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse, \
        const float* delta, const int* key_valid, float* dq_acc, float* dk, float* dv, int H,   \
        int KVH, int T, int S, i64 qsb, i64 qsh, i64 qst, i64 ksb, i64 ksh, i64 kss, i64 vsb,    \
        i64 vsh, i64 vss, i64 dsb, i64 dsh, i64 dst, float scale, int causal) {                 \
        bwd<DIM>(q, k, v, dout, lse, delta, key_valid, dq_acc, dk, dv, H, KVH, T, S, qsb, qsh,  \
                 qst, ksb, ksh, kss, vsb, vsh, vss, dsb, dsh, dst, scale, causal);              \
    }

FWD_ENTRY(64)
FWD_ENTRY(128)
BWD_ENTRY(64)
BWD_ENTRY(128)
