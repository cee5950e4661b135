//! Matrix products that read GGUF blocks in place: a weight row stays in its ggml encoding
//! (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, or F32/F16/BF16) and meets activations quantized per row,
//! as llama.cpp does (ggml-cpu `ggml_vec_dot_*`): 8-bit blocks of 32 ([`BlockQ8`], ggml's
//! Q8_0/Q8_1) for the 32-element formats, 8-bit super-blocks of 256 with 16-element sums
//! ([`BlockQ8K`], ggml's Q8_K) for the k-quants; float weights meet f32 activations.
//!
//! Every product is an integer dot product per block, scaled once per block. The AVX2+FMA+F16C
//! kernels are chosen at run time ([`simd_available`]); the scalar ones are always compiled
//! and serve as the reference in tests. Rows of the output are split over rayon's threads.
//! Reference: llama.cpp ggml/src/ggml-cpu/quants.c (generic dots), arch/x86/quants.c (AVX2).

use half::f16;
use rayon::prelude::*;

use crate::gguf::{GgmlType, QK_K};

/// Weight encodings the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl WeightType {
    /// The kernel's type for a GGUF tensor type, if there is one.
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        Some(match ty {
            GgmlType::F32 => Self::F32,
            GgmlType::F16 => Self::F16,
            GgmlType::BF16 => Self::BF16,
            GgmlType::Q4_0 => Self::Q4_0,
            GgmlType::Q4_1 => Self::Q4_1,
            GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q4_K => Self::Q4K,
            GgmlType::Q6_K => Self::Q6K,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::BF16 => GgmlType::BF16,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4K => GgmlType::Q4_K,
            Self::Q6K => GgmlType::Q6_K,
        }
    }

    /// (elements, bytes) per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// How activations must be encoded to meet this weight type.
    pub fn act_kind(self) -> ActKind {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => ActKind::F32,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => ActKind::Q8,
            Self::Q4K | Self::Q6K => ActKind::Q8K,
        }
    }
}

/// Activation encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    F32,
    Q8,
    Q8K,
}

/// 32 activations as `d * qs[i]`; `s = d * sum(qs)` serves the weight formats with an offset
/// (Q4_0's -8, Q4_1's min), as ggml's Q8_1 does.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

/// 256 activations as `d * qs[i]`, with the sum of each 16 (ggml's `block_q8_K`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; 16],
        }
    }
}

/// Quantizes `x` (a whole number of 32-blocks) into `out`.
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// Quantizes `x` (a whole number of 256-blocks) into `out`.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
        }
        for (j, s) in b.bsums.iter_mut().enumerate() {
            *s = b.qs[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
        }
        b.d = d;
    }
}

/// `rows` activation rows of length `k`, encoded for one [`ActKind`].
#[derive(Debug, Default)]
pub struct Activations {
    pub kind: Option<ActKind>,
    pub rows: usize,
    pub k: usize,
    pub f32: Vec<f32>,
    pub q8: Vec<BlockQ8>,
    pub q8k: Vec<BlockQ8K>,
}

impl Activations {
    /// Encodes `x` (`rows` rows of `k`) for `kind`, reusing the buffers.
    pub fn encode(&mut self, x: &[f32], rows: usize, k: usize, kind: ActKind) {
        debug_assert_eq!(x.len(), rows * k);
        self.kind = Some(kind);
        self.rows = rows;
        self.k = k;
        match kind {
            ActKind::F32 => {
                self.f32.clear();
                self.f32.extend_from_slice(x);
            }
            ActKind::Q8 => {
                self.q8.resize(rows * k / 32, BlockQ8::default());
                quantize_q8(x, &mut self.q8);
            }
            ActKind::Q8K => {
                self.q8k.resize(rows * k / QK_K, BlockQ8K::default());
                quantize_q8k(x, &mut self.q8k);
            }
        }
    }
}

/// A weight matrix `[rows, cols]` in ggml encoding, row-major, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub ty: WeightType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> WeightView<'a> {
    pub fn row_bytes(&self) -> usize {
        let (bs, ts) = self.ty.block();
        self.cols / bs * ts
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.bytes[r * n..(r + 1) * n]
    }
}

/// Whether the AVX2 kernels run on this CPU (AVX2, FMA and F16C).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("RUNNER_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One weight row against one activation row.
type DotFn = fn(&[u8], &Activations, usize) -> f32;

fn dot_fn(ty: WeightType, simd: bool) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return match ty {
            WeightType::F32 => avx2::dot_f32_row,
            WeightType::F16 => avx2::dot_f16_row,
            WeightType::BF16 => avx2::dot_bf16_row,
            WeightType::Q4_0 => avx2::dot_q4_0_row,
            WeightType::Q4_1 => avx2::dot_q4_1_row,
            WeightType::Q8_0 => avx2::dot_q8_0_row,
            WeightType::Q4K => avx2::dot_q4k_row,
            WeightType::Q6K => avx2::dot_q6k_row,
        };
    }
    let _ = simd;
    match ty {
        WeightType::F32 => scalar::dot_f32_row,
        WeightType::F16 => scalar::dot_f16_row,
        WeightType::BF16 => scalar::dot_bf16_row,
        WeightType::Q4_0 => scalar::dot_q4_0_row,
        WeightType::Q4_1 => scalar::dot_q4_1_row,
        WeightType::Q8_0 => scalar::dot_q8_0_row,
        WeightType::Q4K => scalar::dot_q4k_row,
        WeightType::Q6K => scalar::dot_q6k_row,
    }
}

/// `out[r * t + j] = dot(weight row r, activation row j)` for every row of every weight in
/// `ws` (their rows laid end to end, so q, k and v or gate and up share one parallel pass);
/// `out` is row-major `[sum of rows, acts.rows]`. Every weight needs `acts.kind` activations
/// of length `acts.k`.
pub fn matmul_into(ws: &[WeightView<'_>], acts: &Activations, out: &mut [f32], simd: bool) {
    let t = acts.rows;
    let total: usize = ws.iter().map(|w| w.rows).sum();
    assert_eq!(out.len(), total * t, "matmul output size");
    for w in ws {
        assert_eq!(w.cols, acts.k, "matmul inner dimension");
        assert_eq!(Some(w.ty.act_kind()), acts.kind, "activation encoding");
    }
    // Rows per task (a multiple of the 4-row tiles): enough work per task to hide rayon's
    // overhead, enough tasks to balance.
    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = (total / (threads * 8)).clamp(4, 256) / 4 * 4;
    assert!(ws.len() <= 4, "at most four weights share a pass");
    let mut starts = [usize::MAX; 4];
    let mut acc = 0;
    for (i, w) in ws.iter().enumerate() {
        starts[i] = acc;
        acc += w.rows;
    }
    let fns: [Option<DotFn>; 4] = std::array::from_fn(|i| ws.get(i).map(|w| dot_fn(w.ty, simd)));
    let tiles: [Option<Tiles>; 4] =
        std::array::from_fn(|i| ws.get(i).and_then(|w| tile_fns(w.ty, simd)));
    out.par_chunks_mut(chunk_rows * t)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let first = ci * chunk_rows;
            let n = chunk.len() / t;
            let mut i = 0;
            while i < n {
                let r = first + i;
                let wi = (0..ws.len()).rev().find(|&wi| starts[wi] <= r).unwrap_or(0);
                let w = &ws[wi];
                let local = r - starts[wi];
                let rb = w.row_bytes();
                let f = fns[wi].unwrap_or(scalar::dot_f32_row);
                // Every (weight row, token) pair a tile computes gets the same arithmetic
                // whatever the tile's shape, so a row's logits do not depend on which rows
                // share its batch (rows leave a decoding batch as they finish).
                if let Some(tile) = &tiles[wi] {
                    // Fewer than four tokens: four weight rows share each activation block.
                    if t < 4 && (w.rows - local).min(n - i) >= 4 {
                        let bytes = &w.bytes[local * rb..(local + 4) * rb];
                        let mut four = [0f32; 4];
                        for j in 0..t {
                            (tile.rows4)(bytes, rb, acts, j, &mut four);
                            for (r, v) in four.iter().enumerate() {
                                chunk[(i + r) * t + j] = *v;
                            }
                        }
                        i += 4;
                        continue;
                    }
                    // Several tokens: each weight block is unpacked once for four of them; the
                    // last four overlap the ones before when `t` is not a multiple of four.
                    if t >= 4 {
                        let bytes = w.row(local);
                        let row_out = &mut chunk[i * t..(i + 1) * t];
                        let mut j = 0;
                        while j < t {
                            let j0 = j.min(t - 4);
                            (tile.cols4)(bytes, rb, acts, j0, &mut row_out[j0..j0 + 4]);
                            j = j0 + 4;
                        }
                        i += 1;
                        continue;
                    }
                }
                let bytes = w.row(local);
                for (j, o) in chunk[i * t..(i + 1) * t].iter_mut().enumerate() {
                    *o = f(bytes, acts, j);
                }
                i += 1;
            }
        });
}

/// A tile kernel: `rows4` computes four consecutive weight rows (their bytes, `row_bytes`
/// apart) against activation row `j0`; `cols4` one weight row against activation rows
/// `j0..j0 + 4`. Both write four outputs.
type TileFn = fn(&[u8], usize, &Activations, usize, &mut [f32]);

struct Tiles {
    rows4: TileFn,
    cols4: TileFn,
}

fn tile_fns(ty: WeightType, simd: bool) -> Option<Tiles> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return match ty {
            WeightType::Q4_0 => Some(Tiles {
                rows4: avx2::q4_0_rows4,
                cols4: avx2::q4_0_cols4,
            }),
            WeightType::Q4_1 => Some(Tiles {
                rows4: avx2::q4_1_rows4,
                cols4: avx2::q4_1_cols4,
            }),
            WeightType::Q8_0 => Some(Tiles {
                rows4: avx2::q8_0_rows4,
                cols4: avx2::q8_0_cols4,
            }),
            _ => None,
        };
    }
    let _ = (ty, simd);
    None
}

/// Dequantizes one row of a weight (embedding lookups) into `out` (`cols` long).
pub fn dequantize_row(w: &WeightView<'_>, r: usize, out: &mut [f32]) {
    let bytes = w.row(r);
    match w.ty {
        WeightType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WeightType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        WeightType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        WeightType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = scalar::fp16(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..]) {
                    *v = (q as i8) as f32 * d;
                }
            }
        }
        WeightType::Q4_0 | WeightType::Q4_1 => {
            let with_min = w.ty == WeightType::Q4_1;
            let (bs, at) = if with_min { (20, 4) } else { (18, 2) };
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(bs)) {
                let d = scalar::fp16(b, 0);
                let m = if with_min { scalar::fp16(b, 2) } else { 0.0 };
                for j in 0..16 {
                    let (lo, hi) = ((b[at + j] & 0xf) as i32, (b[at + j] >> 4) as i32);
                    if with_min {
                        o[j] = lo as f32 * d + m;
                        o[j + 16] = hi as f32 * d + m;
                    } else {
                        o[j] = (lo - 8) as f32 * d;
                        o[j + 16] = (hi - 8) as f32 * d;
                    }
                }
            }
        }
        WeightType::Q4K | WeightType::Q6K => {
            let (_, ts) = w.ty.block();
            for (o, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(ts)) {
                let mut q = [0i8; QK_K];
                if w.ty == WeightType::Q4K {
                    let d = scalar::fp16(b, 0);
                    let dmin = scalar::fp16(b, 2);
                    scalar::unpack_q4k(b, &mut q);
                    for j in 0..8 {
                        let (sc, m) = scalar::scale_min_k4(j, &b[4..16]);
                        for l in 0..32 {
                            o[32 * j + l] = d * sc as f32 * q[32 * j + l] as f32 - dmin * m as f32;
                        }
                    }
                } else {
                    let d = scalar::fp16(b, 208);
                    scalar::unpack_q6k(b, &mut q);
                    for j in 0..16 {
                        let sc = (b[192 + j] as i8) as f32;
                        for l in 0..16 {
                            o[16 * j + l] = d * sc * q[16 * j + l] as f32;
                        }
                    }
                }
            }
        }
    }
}

/// f32 dot product of two equal-length slices (attention scores).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `simd_available()` found AVX2, FMA and F16C.
        return unsafe { avx2::dot_f32(a, b) };
    }
    let _ = simd;
    scalar::dot_f32(a, b)
}

/// `y += a * x` (attention's weighted sum of values).
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `simd_available()` found AVX2, FMA and F16C.
        return unsafe { avx2::axpy(y, a, x) };
    }
    let _ = simd;
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Cached keys and values of consecutive positions, one head's `d` floats each, back to back
/// (see [`attend_group`]): keys, values, position count.
pub type CacheSpan<'a> = (&'a [f32], &'a [f32], usize);

/// Attention of `g` query heads (`q`: `g * d` floats, head after head) that share one key/value
/// head, over the positions of `spans` in order: `out` (`g * d`) gets each head's
/// softmax(`scale * q k`)-weighted sum of the values. Each cached key and value is read once for
/// the whole group. `scores` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    q: &[f32],
    spans: [Option<CacheSpan<'_>>; 2],
    d: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    simd: bool,
) {
    let g = q.len() / d.max(1);
    assert!(
        g * d == q.len() && out.len() == q.len(),
        "attention group shapes"
    );
    for (k, v, n) in spans.iter().flatten() {
        assert!(n * d <= k.len().min(v.len()), "cache span");
    }
    let n: usize = spans.iter().flatten().map(|s| s.2).sum();
    scores.clear();
    scores.resize(g * n, 0.0);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `simd_available()` found AVX2, FMA and F16C; the
        // spans were checked above.
        unsafe { avx2::attend_group(q, &spans, d, n, scale, scores, out) };
        return;
    }
    let _ = simd;
    attend_group_with(
        q,
        &spans,
        d,
        n,
        scale,
        scores,
        out,
        scalar::dot_f32,
        |y, a, x| {
            for (yi, xi) in y.iter_mut().zip(x) {
                *yi += a * xi;
            }
        },
    );
}

/// The body of [`attend_group`] with its dot product and `y += a x`; inlined into each caller, so
/// the AVX2 one compiles it, and the kernels it is given, with its target features.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_group_with(
    q: &[f32],
    spans: &[Option<CacheSpan<'_>>; 2],
    d: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    let g = q.len() / d;
    let mut at = 0;
    for (k, _, m) in spans.iter().flatten() {
        for (j, kj) in k.chunks_exact(d).take(*m).enumerate() {
            for h in 0..g {
                scores[h * n + at + j] = dot(&q[h * d..(h + 1) * d], kj) * scale;
            }
        }
        at += m;
    }
    scalar::softmax_rows(scores, n);
    out.fill(0.0);
    let mut at = 0;
    for (_, v, m) in spans.iter().flatten() {
        for (j, vj) in v.chunks_exact(d).take(*m).enumerate() {
            for h in 0..g {
                axpy(&mut out[h * d..(h + 1) * d], scores[h * n + at + j], vj);
            }
        }
        at += m;
    }
}

/// Portable kernels: the reference for the SIMD ones.
pub(crate) mod scalar {
    use super::{Activations, BlockQ8, QK_K};
    use half::f16;

    /// Softmax of each head's `n` scores in place.
    pub fn softmax_rows(scores: &mut [f32], n: usize) {
        for row in scores.chunks_mut(n.max(1)) {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
    }

    #[inline]
    pub fn fp16(b: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }

    /// ggml's `get_scale_min_k4`.
    #[inline]
    pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
        if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        }
    }

    /// A Q4_K block's 256 quants (0..15) in element order.
    pub fn unpack_q4k(b: &[u8], q: &mut [i8; QK_K]) {
        let qs = &b[16..144];
        for g in 0..4 {
            for l in 0..32 {
                q[64 * g + l] = (qs[32 * g + l] & 0xf) as i8;
                q[64 * g + 32 + l] = (qs[32 * g + l] >> 4) as i8;
            }
        }
    }

    /// A Q6_K block's 256 quants minus 32 (-32..31) in element order.
    pub fn unpack_q6k(b: &[u8], q: &mut [i8; QK_K]) {
        for half in 0..2 {
            let ql = &b[half * 64..];
            let qh = &b[128 + half * 32..];
            let o = &mut q[half * 128..];
            for l in 0..32 {
                o[l] = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i8 - 32;
                o[l + 32] = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
    }

    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    fn act_f32(acts: &Activations, j: usize) -> &[f32] {
        &acts.f32[j * acts.k..(j + 1) * acts.k]
    }

    fn act_q8(acts: &Activations, j: usize) -> &[BlockQ8] {
        let n = acts.k / 32;
        &acts.q8[j * n..(j + 1) * n]
    }

    pub fn dot_f32_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let x = act_f32(acts, j);
        let mut acc = [0f32; 8];
        for (c, xs) in w.chunks_exact(32).zip(x.chunks_exact(8)) {
            for i in 0..8 {
                let v = f32::from_le_bytes([c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]]);
                acc[i] += v * xs[i];
            }
        }
        let done = x.len() / 8 * 8;
        let tail: f32 = (done..x.len())
            .map(|i| {
                f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]) * x[i]
            })
            .sum();
        acc.iter().sum::<f32>() + tail
    }

    pub fn dot_f16_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        act_f32(acts, j)
            .iter()
            .enumerate()
            .map(|(i, x)| fp16(w, 2 * i) * x)
            .sum()
    }

    pub fn dot_bf16_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        act_f32(acts, j)
            .iter()
            .enumerate()
            .map(|(i, x)| {
                f32::from_bits((u16::from_le_bytes([w[2 * i], w[2 * i + 1]]) as u32) << 16) * x
            })
            .sum()
    }

    pub fn dot_q4_0_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let mut sum = 0f32;
        for (b, a) in w.chunks_exact(18).zip(act_q8(acts, j)) {
            let d = fp16(b, 0);
            let mut isum = 0i32;
            for l in 0..16 {
                isum += (b[2 + l] & 0xf) as i32 * a.qs[l] as i32;
                isum += (b[2 + l] >> 4) as i32 * a.qs[l + 16] as i32;
            }
            // (q - 8) * y summed = sum(q * y) - 8 * sum(y)
            sum += d * (a.d * isum as f32 - 8.0 * a.s);
        }
        sum
    }

    pub fn dot_q4_1_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let mut sum = 0f32;
        for (b, a) in w.chunks_exact(20).zip(act_q8(acts, j)) {
            let (d, m) = (fp16(b, 0), fp16(b, 2));
            let mut isum = 0i32;
            for l in 0..16 {
                isum += (b[4 + l] & 0xf) as i32 * a.qs[l] as i32;
                isum += (b[4 + l] >> 4) as i32 * a.qs[l + 16] as i32;
            }
            sum += d * a.d * isum as f32 + m * a.s;
        }
        sum
    }

    pub fn dot_q8_0_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let mut sum = 0f32;
        for (b, a) in w.chunks_exact(34).zip(act_q8(acts, j)) {
            let isum: i32 = b[2..34]
                .iter()
                .zip(&a.qs)
                .map(|(&q, &y)| (q as i8) as i32 * y as i32)
                .sum();
            sum += fp16(b, 0) * a.d * isum as f32;
        }
        sum
    }

    pub fn dot_q4k_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let n = acts.k / QK_K;
        let mut sum = 0f32;
        let mut q = [0i8; QK_K];
        for (b, a) in w.chunks_exact(144).zip(&acts.q8k[j * n..(j + 1) * n]) {
            unpack_q4k(b, &mut q);
            let (mut scaled, mut mins) = (0i32, 0i32);
            for sub in 0..8 {
                let (sc, m) = scale_min_k4(sub, &b[4..16]);
                let isum: i32 = (0..32)
                    .map(|l| q[32 * sub + l] as i32 * a.qs[32 * sub + l] as i32)
                    .sum();
                scaled += sc as i32 * isum;
                mins += m as i32 * (a.bsums[2 * sub] as i32 + a.bsums[2 * sub + 1] as i32);
            }
            sum += a.d * (fp16(b, 0) * scaled as f32 - fp16(b, 2) * mins as f32);
        }
        sum
    }

    pub fn dot_q6k_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let n = acts.k / QK_K;
        let mut sum = 0f32;
        let mut q = [0i8; QK_K];
        for (b, a) in w.chunks_exact(210).zip(&acts.q8k[j * n..(j + 1) * n]) {
            unpack_q6k(b, &mut q);
            let mut scaled = 0i32;
            for sub in 0..16 {
                let isum: i32 = (0..16)
                    .map(|l| q[16 * sub + l] as i32 * a.qs[16 * sub + l] as i32)
                    .sum();
                scaled += (b[192 + sub] as i8) as i32 * isum;
            }
            sum += a.d * fp16(b, 208) * scaled as f32;
        }
        sum
    }
}

/// AVX2 + FMA + F16C kernels (x86-64). Each `*_row` wrapper is only handed out by `dot_fn`
/// when [`simd_available`] is true.
#[cfg(target_arch = "x86_64")]
// The tile kernels index their `R x C` accumulators by row and column on purpose.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::{Activations, BlockQ8, BlockQ8K, QK_K};
    use std::arch::x86_64::*;

    macro_rules! row_wrapper {
        ($name:ident, $inner:ident) => {
            pub fn $name(w: &[u8], acts: &Activations, j: usize) -> f32 {
                // SAFETY: `dot_fn` returns this wrapper only when `simd_available()` found
                // AVX2, FMA and F16C on this CPU.
                unsafe { $inner(w, acts, j) }
            }
        };
    }
    row_wrapper!(dot_f32_row, f32_row);
    row_wrapper!(dot_f16_row, f16_row);
    row_wrapper!(dot_bf16_row, bf16_row);
    row_wrapper!(dot_q4_0_row, q4_0_row);
    row_wrapper!(dot_q4_1_row, q4_1_row);
    row_wrapper!(dot_q8_0_row, q8_0_row);
    row_wrapper!(dot_q4k_row, q4k_row);
    row_wrapper!(dot_q6k_row, q6k_row);

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Sum of the eight i32 lanes of `u8 x i8` products of 32 pairs, as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn mul_sum_u8_i8(x: __m256i, y: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// 32 nibbles of 16 bytes: low nibbles then high nibbles (ggml's element order).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        let t = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: every load reads 8 floats at an index + 8 <= n, inside both slices.
        unsafe {
            while i + 16 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            while i + 8 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        // SAFETY: every access covers 8 floats at an index + 8 <= n, inside both slices.
        unsafe {
            while i + 8 <= n {
                let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
                i += 8;
            }
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
        }
    }

    /// [`super::attend_group`] with the dot products and the weighted sums inlined.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_group(
        q: &[f32],
        spans: &[Option<super::CacheSpan<'_>>; 2],
        d: usize,
        n: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        super::attend_group_with(
            q,
            spans,
            d,
            n,
            scale,
            scores,
            out,
            // SAFETY: this function's target features are the callees'.
            |a, b| unsafe { dot_f32(a, b) },
            |y, a, x| unsafe { axpy(y, a, x) },
        );
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f32_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let x = &acts.f32[j * acts.k..(j + 1) * acts.k];
        let n = x.len();
        assert!(w.len() >= 4 * n);
        let (pw, px) = (w.as_ptr() as *const f32, x.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: `w` holds 4n bytes (checked above), read unaligned; `x` holds n floats.
        unsafe {
            while i + 16 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(px.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pw.add(i + 8)),
                    _mm256_loadu_ps(px.add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            while i + 8 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(px.add(i)), acc0);
                i += 8;
            }
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            let c = &w[4 * i..4 * i + 4];
            s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * x[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let x = &acts.f32[j * acts.k..(j + 1) * acts.k];
        let n = x.len();
        assert!(w.len() >= 2 * n);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: `w` holds 2n bytes (checked above); each load reads 8 halves below n.
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i);
                acc = _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x.as_ptr().add(i)), acc);
                i += 8;
            }
        }
        let mut s = hsum(acc);
        while i < n {
            s += super::scalar::fp16(w, 2 * i) * x[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bf16_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let x = &acts.f32[j * acts.k..(j + 1) * acts.k];
        let n = x.len();
        assert!(w.len() >= 2 * n);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: `w` holds 2n bytes (checked above); each load reads 8 halves below n.
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i);
                let v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(x.as_ptr().add(i)), acc);
                i += 8;
            }
        }
        let mut s = hsum(acc);
        while i < n {
            s += f32::from_bits((u16::from_le_bytes([w[2 * i], w[2 * i + 1]]) as u32) << 16) * x[i];
            i += 1;
        }
        s
    }

    fn q8_row(acts: &Activations, j: usize) -> &[BlockQ8] {
        let n = acts.k / 32;
        &acts.q8[j * n..(j + 1) * n]
    }

    /// The f16 at `p` and the one after it as f32 (a block's `d` and `m`), read as one u32 so
    /// that the conversion depends on nothing but the load.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fp16_pair(p: *const u8) -> (f32, f32) {
        // SAFETY: the caller guarantees four readable bytes at `p`.
        let v = unsafe { std::ptr::read_unaligned(p as *const i32) };
        let f = _mm_cvtph_ps(_mm_cvtsi32_si128(v));
        (_mm_cvtss_f32(f), _mm_cvtss_f32(_mm_movehdup_ps(f)))
    }

    /// One Q4_0/Q4_1 block against one activation block: the scaled integer sums as eight
    /// lanes, and the offset term (`-8 d s` or `m s`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_block(p: *const u8, blk: &BlockQ8, with_min: bool, acc: __m256) -> (__m256, f32) {
        // SAFETY: the caller guarantees a whole block (18 or 20 bytes) at `p`.
        unsafe {
            let (d, m) = fp16_pair(p);
            let q = nibbles(p.add(if with_min { 4 } else { 2 }));
            let y = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
            let acc = _mm256_fmadd_ps(_mm256_set1_ps(d * blk.d), mul_sum_u8_i8(q, y), acc);
            let off = if with_min {
                m * blk.s
            } else {
                -8.0 * d * blk.s
            };
            (acc, off)
        }
    }

    /// Q4_0 and Q4_1: `sum(q * y)` in integers per block; the offset term through `a.s`. Two
    /// blocks per iteration with their own accumulators, so that the chains overlap.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_row(w: &[u8], a: &[BlockQ8], bs: usize, with_min: bool) -> f32 {
        assert!(w.len() >= a.len() * bs);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut off0, mut off1) = (0f32, 0f32);
        let p = w.as_ptr();
        let mut i = 0;
        // SAFETY: block i spans bytes [i * bs, (i + 1) * bs) of `w` (length checked above).
        unsafe {
            while i + 2 <= a.len() {
                let (v0, o0) = q4_block(p.add(i * bs), &a[i], with_min, acc0);
                let (v1, o1) = q4_block(p.add((i + 1) * bs), &a[i + 1], with_min, acc1);
                (acc0, acc1) = (v0, v1);
                off0 += o0;
                off1 += o1;
                i += 2;
            }
            if i < a.len() {
                let (v0, o0) = q4_block(p.add(i * bs), &a[i], with_min, acc0);
                acc0 = v0;
                off0 += o0;
            }
        }
        hsum(_mm256_add_ps(acc0, acc1)) + off0 + off1
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        // SAFETY: same contract as this function's.
        unsafe { q4_row(w, q8_row(acts, j), 18, false) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        // SAFETY: same contract as this function's.
        unsafe { q4_row(w, q8_row(acts, j), 20, true) }
    }

    /// One Q8_0 block (34 bytes at `p`) against one activation block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_block(p: *const u8, blk: &BlockQ8, acc: __m256) -> __m256 {
        // SAFETY: the caller guarantees 34 readable bytes at `p`.
        unsafe {
            let (d, _) = fp16_pair(p);
            let x = _mm256_loadu_si256(p.add(2) as *const __m256i);
            let y = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
            // Signed x signed through maddubs: |x| times y with x's sign.
            let prod = mul_sum_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
            _mm256_fmadd_ps(_mm256_set1_ps(d * blk.d), prod, acc)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let a = q8_row(acts, j);
        assert!(w.len() >= a.len() * 34);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let p = w.as_ptr();
        let mut i = 0;
        // SAFETY: block i spans bytes [34 i, 34 i + 34) of `w` (length checked above).
        unsafe {
            while i + 2 <= a.len() {
                acc0 = q8_block(p.add(i * 34), &a[i], acc0);
                acc1 = q8_block(p.add((i + 1) * 34), &a[i + 1], acc1);
                i += 2;
            }
            if i < a.len() {
                acc0 = q8_block(p.add(i * 34), &a[i], acc0);
            }
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    macro_rules! tile_wrapper {
        ($name:ident, $($inner:tt)*) => {
            pub fn $name(w: &[u8], rb: usize, acts: &Activations, j0: usize, out: &mut [f32]) {
                // SAFETY: `tile_fns` returns this wrapper only when `simd_available()` found
                // AVX2, FMA and F16C on this CPU; the kernel checks its bounds.
                unsafe { $($inner)*(w, rb, acts, j0, out) }
            }
        };
    }
    tile_wrapper!(q4_0_rows4, q4_tile::<4, 1, false>);
    tile_wrapper!(q4_0_cols4, q4_tile::<1, 4, false>);
    tile_wrapper!(q4_1_rows4, q4_tile::<4, 1, true>);
    tile_wrapper!(q4_1_cols4, q4_tile::<1, 4, true>);
    tile_wrapper!(q8_0_rows4, q8_tile::<4, 1>);
    tile_wrapper!(q8_0_cols4, q8_tile::<1, 4>);

    /// `R` Q4_0/Q4_1 rows (`rb` bytes apart) against activation rows `j0..j0 + C`:
    /// `out[r * C + c]`. Each weight block is unpacked once for the `C` columns and each
    /// activation block loaded once for the `R` rows; the `R * C` chains run side by side.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_tile<const R: usize, const C: usize, const MIN: bool>(
        w: &[u8],
        rb: usize,
        acts: &Activations,
        j0: usize,
        out: &mut [f32],
    ) {
        let nb = acts.k / 32;
        let bs = if MIN { 20 } else { 18 };
        assert!(nb * bs <= rb && w.len() >= (R - 1) * rb + nb * bs);
        assert!(acts.q8.len() >= (j0 + C) * nb && out.len() >= R * C);
        let a = &acts.q8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut off = [[0f32; C]; R];
        for b in 0..nb {
            let mut y = [_mm256_setzero_si256(); C];
            let mut ad = [0f32; C];
            let mut asum = [0f32; C];
            for c in 0..C {
                let blk = &a[(j0 + c) * nb + b];
                // SAFETY: `blk.qs` is 32 bytes.
                y[c] = unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) };
                ad[c] = blk.d;
                asum[c] = blk.s;
            }
            for r in 0..R {
                // SAFETY: block b of row r spans [r rb + b bs, r rb + (b + 1) bs), inside `w`
                // (checked above).
                let (d, m, q) = unsafe {
                    let p = w.as_ptr().add(r * rb + b * bs);
                    let (d, m) = fp16_pair(p);
                    (d, m, nibbles(p.add(if MIN { 4 } else { 2 })))
                };
                for c in 0..C {
                    acc[r][c] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * ad[c]),
                        mul_sum_u8_i8(q, y[c]),
                        acc[r][c],
                    );
                    off[r][c] += if MIN { m * asum[c] } else { -8.0 * d * asum[c] };
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r * C + c] = hsum(acc[r][c]) + off[r][c];
            }
        }
    }

    /// [`q4_tile`] for Q8_0 rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_tile<const R: usize, const C: usize>(
        w: &[u8],
        rb: usize,
        acts: &Activations,
        j0: usize,
        out: &mut [f32],
    ) {
        let nb = acts.k / 32;
        assert!(nb * 34 <= rb && w.len() >= (R - 1) * rb + nb * 34);
        assert!(acts.q8.len() >= (j0 + C) * nb && out.len() >= R * C);
        let a = &acts.q8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let mut y = [_mm256_setzero_si256(); C];
            let mut ad = [0f32; C];
            for c in 0..C {
                let blk = &a[(j0 + c) * nb + b];
                // SAFETY: `blk.qs` is 32 bytes.
                y[c] = unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) };
                ad[c] = blk.d;
            }
            for r in 0..R {
                // SAFETY: block b of row r spans [r rb + 34 b, r rb + 34 b + 34), inside `w`
                // (checked above).
                let (d, x) = unsafe {
                    let p = w.as_ptr().add(r * rb + b * 34);
                    (
                        fp16_pair(p).0,
                        _mm256_loadu_si256(p.add(2) as *const __m256i),
                    )
                };
                let ax = _mm256_sign_epi8(x, x);
                for c in 0..C {
                    let prod = mul_sum_u8_i8(ax, _mm256_sign_epi8(y[c], x));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d * ad[c]), prod, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                out[r * C + c] = hsum(acc[r][c]);
            }
        }
    }

    /// Horizontal i32 sum of 4 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_i32x4(v: __m128i) -> i32 {
        let s = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// Horizontal i32 sum of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let n = acts.k / QK_K;
        let a: &[BlockQ8K] = &acts.q8k[j * n..(j + 1) * n];
        assert!(w.len() >= n * 144);
        let ones = _mm256_set1_epi16(1);
        let mut sum = 0f32;
        for (i, blk) in a.iter().enumerate() {
            let b = &w[i * 144..(i + 1) * 144];
            let mut scaled = 0i32;
            let mut mins = 0i32;
            for g in 0..4 {
                // SAFETY: bytes [16 + 32 g, 48 + 32 g) of the 144-byte block and 64 quants of
                // `blk.qs` from 64 g are in bounds.
                unsafe {
                    let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * g) as *const __m256i);
                    let lo = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0f));
                    let y0 = _mm256_loadu_si256(blk.qs.as_ptr().add(64 * g) as *const __m256i);
                    let y1 = _mm256_loadu_si256(blk.qs.as_ptr().add(64 * g + 32) as *const __m256i);
                    let s0 = hsum_i32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), ones));
                    let s1 = hsum_i32(_mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), ones));
                    let (sc0, m0) = super::scalar::scale_min_k4(2 * g, &b[4..16]);
                    let (sc1, m1) = super::scalar::scale_min_k4(2 * g + 1, &b[4..16]);
                    scaled += sc0 as i32 * s0 + sc1 as i32 * s1;
                    mins += m0 as i32 * (blk.bsums[4 * g] as i32 + blk.bsums[4 * g + 1] as i32)
                        + m1 as i32 * (blk.bsums[4 * g + 2] as i32 + blk.bsums[4 * g + 3] as i32);
                }
            }
            let (d, dmin) = (super::scalar::fp16(b, 0), super::scalar::fp16(b, 2));
            sum += blk.d * (d * scaled as f32 - dmin * mins as f32);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k_row(w: &[u8], acts: &Activations, j: usize) -> f32 {
        let n = acts.k / QK_K;
        let a: &[BlockQ8K] = &acts.q8k[j * n..(j + 1) * n];
        assert!(w.len() >= n * 210);
        let mut q = [0i8; QK_K];
        let mut sum = 0f32;
        for (i, blk) in a.iter().enumerate() {
            let b = &w[i * 210..(i + 1) * 210];
            super::scalar::unpack_q6k(b, &mut q);
            let mut scaled = 0i32;
            for sub in 0..8 {
                // SAFETY: 32 quants from 32 sub in `q` and `blk.qs` (both 256 long).
                unsafe {
                    let x = _mm256_loadu_si256(q.as_ptr().add(32 * sub) as *const __m256i);
                    let y = _mm256_loadu_si256(blk.qs.as_ptr().add(32 * sub) as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
                    // Two 16-element groups with their own scales: lanes 0..3 and 4..7 of the
                    // pairwise sums hold elements 0..7 + 16..23 ... so sum each 128-bit half.
                    let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
                    let lo = _mm256_castsi256_si128(p32);
                    let hi = _mm256_extracti128_si256(p32, 1);
                    let sc0 = (b[192 + 2 * sub] as i8) as i32;
                    let sc1 = (b[192 + 2 * sub + 1] as i8) as i32;
                    scaled += sc0 * hsum_i32x4(lo) + sc1 * hsum_i32x4(hi);
                }
            }
            sum += blk.d * super::scalar::fp16(b, 208) * scaled as f32;
        }
        sum
    }
}
