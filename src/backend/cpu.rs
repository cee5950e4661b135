//! `FastOps` for burn's ndarray backend (f32).
//!
//! burn-ndarray's matmul turns any operand that is not in standard layout into a fresh copy, so
//! every linear layer read through a transposed view (`x @ W^T`, HF layout) copied its whole
//! weight on each call: decoding SmolLM2 on CPU spent most of its time copying weights. Here the
//! product is handed to `matrixmultiply` (through ndarray's `general_mat_mul`) with the
//! operands' own strides, so transposed and sliced views are read in place.

use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use ndarray::{linalg::general_mat_mul, Array2, Array3, ArrayView3, ArrayViewD, Axis, Ix2, Ix3};
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
            for (j, row) in rows.chunks_exact(k).enumerate() {
                for i in 0..m {
                    part[i * count + j] = dot(&x[i * k..(i + 1) * k], row);
                }
            }
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
