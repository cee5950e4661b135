//! `FastOps` for burn's ndarray backend (f32).
//!
//! burn-ndarray's matmul turns any operand that is not in standard layout into a fresh copy, so
//! every linear layer read through a transposed view (`x @ W^T`, HF layout) copied its whole
//! weight on each call: decoding SmolLM2 on CPU spent most of its time copying weights. Here the
//! product is handed to `matrixmultiply` (through ndarray's `general_mat_mul`) with the
//! operands' own strides, so transposed and sliced views are read in place.

use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{Int, Tensor, TensorPrimitive};
use ndarray::{
    linalg::general_mat_mul, s, Array1, Array2, Array3, ArrayView2, ArrayView3, ArrayViewD, Axis,
    Ix2, Ix3,
};
use rayon::prelude::*;

use crate::backend::FastOps;

impl FastOps for NdArray {
    fn fast_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        match (lhs, rhs) {
            (NdArrayTensor::F32(lhs), NdArrayTensor::F32(rhs)) => {
                let out = strided_matmul(lhs.view(), rhs.view());
                NdArrayTensor::from(out.into_dyn().into_shared())
            }
            (lhs, rhs) => Self::float_matmul(lhs, rhs),
        }
    }

    fn fast_host_f32(x: FloatTensor<Self>) -> Option<Vec<f32>> {
        match x {
            NdArrayTensor::F32(x) => {
                let x = x.view();
                Some(match (x.as_slice(), x.ndim()) {
                    (Some(values), _) => values.to_vec(),
                    // A transposed or sliced matrix: ndarray's fixed-rank walk, not IxDyn's.
                    (None, 2) => matrix(x).iter().copied().collect(),
                    (None, _) => x.iter().copied().collect(),
                })
            }
            _ => None,
        }
    }

    fn fast_narrow(x: FloatTensor<Self>, len: usize) -> FloatTensor<Self> {
        match x {
            NdArrayTensor::F32(x) => {
                let mut x = x.into_shared();
                x.slice_axis_inplace(Axis(1), ndarray::Slice::from(0..len));
                NdArrayTensor::from(x)
            }
            x => {
                let x = Tensor::<Self, 3>::from_primitive(TensorPrimitive::Float(x));
                x.narrow(1, 0, len).into_primitive().tensor()
            }
        }
    }

    fn fast_gemm_2d(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        match (a, b) {
            (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) => {
                let (a, b) = (a.view(), b.view());
                let a = a.into_dimensionality::<Ix2>().expect("2-d lhs");
                let b = b.into_dimensionality::<Ix2>().expect("2-d rhs");
                let a = if transpose_a { a.reversed_axes() } else { a };
                let b = if transpose_b { b.reversed_axes() } else { b };
                assert_eq!(
                    a.ncols(),
                    b.nrows(),
                    "gemm: inner dimensions differ ({} vs {})",
                    a.ncols(),
                    b.nrows()
                );
                let mut out = Array2::<f32>::zeros((a.nrows(), b.ncols()));
                if transpose_b && a.nrows() <= DOT_ROWS {
                    // Few rows against an [out, in] weight (decoding): dot products of rows
                    // stream the weight once, where matrixmultiply would first copy all of it
                    // into its packed layout. Chosen by shape alone, never by memory layout, so
                    // a result never depends on how its operands happen to be stored.
                    let x = a.as_standard_layout();
                    let bt = b.t();
                    let w = bt.as_standard_layout();
                    rows_dot_weight(
                        x.as_slice().expect("standard layout"),
                        w.as_slice().expect("standard layout"),
                        a.ncols(),
                        out.as_slice_mut().expect("fresh array"),
                    );
                } else {
                    general_mat_mul(1.0, &a, &b, 0.0, &mut out);
                }
                NdArrayTensor::from(out.into_dyn().into_shared())
            }
            (a, b) => {
                let a = if transpose_a {
                    Self::float_transpose(a)
                } else {
                    a
                };
                let b = if transpose_b {
                    Self::float_transpose(b)
                } else {
                    b
                };
                Self::float_matmul(a, b)
            }
        }
    }

    fn fast_token_logps_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f64,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match (hidden, weight) {
            (NdArrayTensor::F32(h), NdArrayTensor::F32(w)) => {
                let (h, w) = (matrix(h.view()), matrix(w.view()));
                let targets = int_values(targets);
                let (logps, lse) = token_logps_forward(h, w, &targets, temperature as f32, chunk);
                (vector(logps), vector(lse))
            }
            (h, w) => crate::backend::token_logps::forward_primitive::<Self>(
                h,
                w,
                targets,
                temperature,
                chunk,
            ),
        }
    }

    fn fast_token_logps_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        temperature: f64,
        chunk: usize,
        want: (bool, bool),
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        match (hidden, weight, lse, upstream) {
            (
                NdArrayTensor::F32(h),
                NdArrayTensor::F32(w),
                NdArrayTensor::F32(lse),
                NdArrayTensor::F32(upstream),
            ) => {
                let (h, w) = (matrix(h.view()), matrix(w.view()));
                let lse: Vec<f32> = lse.view().iter().copied().collect();
                let upstream: Vec<f32> = upstream.view().iter().copied().collect();
                let targets = int_values(targets);
                let (dh, dw) = token_logps_backward(
                    h,
                    w,
                    &targets,
                    &lse,
                    &upstream,
                    temperature as f32,
                    chunk,
                    want,
                );
                let wrap = |a: Array2<f32>| NdArrayTensor::from(a.into_dyn().into_shared());
                (dh.map(wrap), dw.map(wrap))
            }
            (h, w, lse, upstream) => crate::backend::token_logps::backward_primitive::<Self>(
                h,
                w,
                targets,
                lse,
                upstream,
                temperature,
                chunk,
                want,
            ),
        }
    }
}

fn matrix(x: ArrayViewD<'_, f32>) -> ArrayView2<'_, f32> {
    x.into_dimensionality::<Ix2>().expect("a 2-d tensor")
}

fn vector(v: Vec<f32>) -> FloatTensor<NdArray> {
    NdArrayTensor::from(Array1::from_vec(v).into_dyn().into_shared())
}

fn int_values(t: IntTensor<NdArray>) -> Vec<i64> {
    Tensor::<NdArray, 1, Int>::from_primitive(t)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("integer targets")
}

/// Rows of logits computed at once: at most 4 M logits (16 MB), one buffer reused by every
/// chunk, so the head's logits neither fault in fresh pages per chunk nor leave the caches
/// between their product and the pass that reads them.
fn logit_rows(chunk: usize, vocab: usize) -> usize {
    chunk.min((1 << 22) / vocab.max(1)).max(1)
}

/// [`crate::backend::token_logps::forward`] on f32 arrays: each chunk's logits into one reused
/// buffer, then one pass per row (rows split over rayon) for its log-sum-exp and target.
fn token_logps_forward(
    h: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
    targets: &[i64],
    temperature: f32,
    chunk: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (n, vocab) = (h.nrows(), w.nrows());
    let rows = logit_rows(chunk, vocab);
    let mut logits = Array2::<f32>::zeros((rows.min(n), vocab));
    let (mut logps, mut lses) = (vec![0.0f32; n], vec![0.0f32; n]);
    for start in (0..n).step_by(rows) {
        let end = (start + rows).min(n);
        let mut block = logits.slice_mut(s![..end - start, ..]);
        general_mat_mul(1.0, &h.slice(s![start..end, ..]), &w.t(), 0.0, &mut block);
        let flat = block
            .as_slice_mut()
            .expect("leading rows of a standard array");
        flat.par_chunks_mut(vocab)
            .zip(logps[start..end].par_iter_mut())
            .zip(lses[start..end].par_iter_mut())
            .zip(targets[start..end].par_iter())
            .for_each(|(((z, logp), lse), &target)| {
                let max = z
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x / temperature));
                let sum: f32 = z.iter().map(|&x| (x / temperature - max).exp()).sum();
                *lse = sum.ln() + max;
                *logp = if target >= 0 {
                    z[target as usize] / temperature - *lse
                } else {
                    0.0
                };
            });
    }
    (logps, lses)
}

/// [`crate::backend::token_logps::backward`] on f32 arrays: each chunk's logits recomputed into
/// one reused buffer and overwritten in place by `dlogits = upstream (onehot - softmax) /
/// temperature` (rows with no upstream gradient, the padding, skip the exponentials), then
/// `dh = dlogits W` written into its rows and `dW += dlogits^T h`.
#[allow(clippy::too_many_arguments)]
fn token_logps_backward(
    h: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
    targets: &[i64],
    lse: &[f32],
    upstream: &[f32],
    temperature: f32,
    chunk: usize,
    want: (bool, bool),
) -> (Option<Array2<f32>>, Option<Array2<f32>>) {
    let (n, d, vocab) = (h.nrows(), h.ncols(), w.nrows());
    let rows = logit_rows(chunk, vocab);
    let mut dh = want.0.then(|| Array2::<f32>::zeros((n, d)));
    let mut dw = want.1.then(|| Array2::<f32>::zeros((vocab, d)));
    if dh.is_none() && dw.is_none() {
        return (None, None);
    }
    let mut logits = Array2::<f32>::zeros((rows.min(n), vocab));
    for start in (0..n).step_by(rows) {
        let end = (start + rows).min(n);
        let hc = h.slice(s![start..end, ..]);
        let mut block = logits.slice_mut(s![..end - start, ..]);
        general_mat_mul(1.0, &hc, &w.t(), 0.0, &mut block);
        let flat = block
            .as_slice_mut()
            .expect("leading rows of a standard array");
        flat.par_chunks_mut(vocab).enumerate().for_each(|(i, z)| {
            let r = start + i;
            let target = targets[r];
            let g = if target >= 0 { upstream[r] } else { 0.0 };
            if g == 0.0 {
                z.fill(0.0);
                return;
            }
            let target = target as usize;
            let at_target = z[target];
            for x in z.iter_mut() {
                *x = -g * (*x / temperature - lse[r]).exp() / temperature;
            }
            let p = (at_target / temperature - lse[r]).exp();
            z[target] = (-g * p + g) / temperature;
        });
        let block = logits.slice(s![..end - start, ..]);
        if let Some(dh) = dh.as_mut() {
            let mut out = dh.slice_mut(s![start..end, ..]);
            general_mat_mul(1.0, &block, &w, 0.0, &mut out);
        }
        if let Some(dw) = dw.as_mut() {
            general_mat_mul(1.0, &block.t(), &hc, 1.0, dw);
        }
    }
    (dh, dw)
}

/// Products with at most this many rows use [`rows_dot_weight`].
const DOT_ROWS: usize = 32;

/// `out [m, n] = x [m, k] @ w [n, k]^T` with both operands row-major, as `m * n` dot products
/// of contiguous rows, split over rayon by blocks of weight rows.
fn rows_dot_weight(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let m = x.len() / k;
    let n = w.len() / k;
    const BLOCK: usize = 64;
    let mut by_block: Vec<Vec<f32>> = w
        .par_chunks(BLOCK * k)
        .map(|rows| {
            let count = rows.len() / k;
            let mut part = vec![0.0f32; m * count];
            block_dots(x, rows, k, &mut part);
            part
        })
        .collect();
    for (block, part) in by_block.iter_mut().enumerate() {
        let count = part.len() / m.max(1);
        for i in 0..m {
            let start = i * n + block * BLOCK;
            out[start..start + count].copy_from_slice(&part[i * count..(i + 1) * count]);
        }
    }
}

/// `part [m, count]` = the dot products of the rows of `x [m, k]` with the rows of `w [count, k]`.
///
/// On x86-64 with AVX2 and FMA (checked at run time: release builds target the baseline CPU,
/// whose SSE2 made these dot products most of a decoding step) each dot product is computed in
/// the same order whatever `m` is, so a row's result never depends on its batch.
fn block_dots(x: &[f32], w: &[f32], k: usize, part: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has both features, checked just above.
        unsafe { avx2::block_dots(x, w, k, part) };
        return;
    }
    let count = w.len() / k;
    for (j, row) in w.chunks_exact(k).enumerate() {
        for (i, xi) in x.chunks_exact(k).enumerate() {
            part[i * count + j] = dot(xi, row);
        }
    }
}

/// A dot product with eight running sums, which the compiler turns into SIMD lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::block_dots`] with 256-bit FMAs: two weight rows against four rows of `x` at a
    /// time (eight accumulators), so each loaded vector feeds several products.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_dots(x: &[f32], w: &[f32], k: usize, part: &mut [f32]) {
        let m = x.len() / k;
        let count = w.len() / k;
        let lanes = k / 8 * 8;
        for j in (0..count).step_by(2) {
            let pair = j + 1 < count;
            let w0 = &w[j * k..(j + 1) * k];
            let w1 = if pair {
                &w[(j + 1) * k..(j + 2) * k]
            } else {
                w0
            };
            for i in (0..m).step_by(4) {
                let rows = (m - i).min(4);
                // Missing rows repeat the last one; their sums are not stored.
                let xr: [&[f32]; 4] = std::array::from_fn(|r| {
                    let row = i + r.min(rows - 1);
                    &x[row * k..(row + 1) * k]
                });
                let mut acc = [[_mm256_setzero_ps(); 4]; 2];
                let mut p = 0;
                while p < lanes {
                    // SAFETY: p + 8 <= lanes <= k, the length of every row read here.
                    let a0 = _mm256_loadu_ps(w0.as_ptr().add(p));
                    let a1 = _mm256_loadu_ps(w1.as_ptr().add(p));
                    for r in 0..4 {
                        let xv = _mm256_loadu_ps(xr[r].as_ptr().add(p));
                        acc[0][r] = _mm256_fmadd_ps(a0, xv, acc[0][r]);
                        acc[1][r] = _mm256_fmadd_ps(a1, xv, acc[1][r]);
                    }
                    p += 8;
                }
                for r in 0..rows {
                    let tail =
                        |wr: &[f32]| -> f32 { (lanes..k).map(|q| wr[q] * xr[r][q]).sum::<f32>() };
                    part[(i + r) * count + j] = sum8(acc[0][r]) + tail(w0);
                    if pair {
                        part[(i + r) * count + j + 1] = sum8(acc[1][r]) + tail(w1);
                    }
                }
            }
        }
    }

    /// The eight lanes of `v` added in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum8(v: __m256) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        let one = _mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
        _mm_cvtss_f32(one)
    }
}

/// `lhs [bl, m, k] @ rhs [br, k, n]` where `bl` or `br` may be 1 and broadcasts; any strides.
fn strided_matmul(lhs: ArrayViewD<'_, f32>, rhs: ArrayViewD<'_, f32>) -> Array3<f32> {
    let lhs: ArrayView3<'_, f32> = lhs.into_dimensionality::<Ix3>().expect("3-d lhs");
    let rhs: ArrayView3<'_, f32> = rhs.into_dimensionality::<Ix3>().expect("3-d rhs");
    let (bl, m, k) = lhs.dim();
    let (br, k2, n) = rhs.dim();
    assert_eq!(k, k2, "matmul: inner dimensions differ ({k} vs {k2})");
    assert!(
        bl == br || bl == 1 || br == 1,
        "matmul: batches {bl} and {br} do not broadcast"
    );
    let batches = bl.max(br);
    let mut out = Array3::<f32>::zeros((batches, m, n));
    let product = |b: usize, mut dst: ndarray::ArrayViewMut2<'_, f32>| {
        let a = lhs.index_axis(Axis(0), if bl == 1 { 0 } else { b });
        let w = rhs.index_axis(Axis(0), if br == 1 { 0 } else { b });
        general_mat_mul(1.0, &a, &w, 0.0, &mut dst);
    };
    if batches == 1 {
        // One large product: matrixmultiply splits it over its own threads.
        product(0, out.index_axis_mut(Axis(0), 0));
    } else {
        // Many small products (attention heads): one per rayon task.
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(b, dst)| product(b, dst));
    }
    out
}
