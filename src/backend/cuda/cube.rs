//! `FastOps` for burn-cuda's `CubeBackend<CudaRuntime, ..>`: routes batched matmuls to cuBLAS
//! on the tensors' own device memory, reading transposed and strided views without copies.
//!
//! Reference: burn's `examples/custom-cubecl-kernel/src/forward.rs` (v0.21.0) for the
//! CubeTensor plumbing; `crate::backend::cuda::cublas` for the GEMM itself.
//! The GEMM is queued on the CUDA stream that owns the output's memory (cubecl's stream for
//! this thread; `GpuResource::stream` comes from runner's patch of cubecl-cuda, see
//! vendor/cubecl-cuda/RUNNER_PATCH.md), so it runs in order with cubecl's kernels and the host
//! never waits.

use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType, Shape, TensorMetadata,
};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, tensor::CubeTensor, CubeBackend, FloatElement,
    IntElement,
};
use cubecl::cuda::CudaRuntime;

use crate::backend::attention::{reference_backward_primitive, reference_forward_primitive};
use crate::backend::cuda::cublas::{self, Gemm, GemmDtype, Operand};
use crate::backend::cuda::flash;
use crate::backend::{Error, FastOps, FusedAttentionSpec};

type Cube<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

fn gemm_dtype(dtype: DType) -> Option<GemmDtype> {
    match dtype {
        DType::BF16 => Some(GemmDtype::Bf16),
        DType::F16 => Some(GemmDtype::F16),
        DType::F32 => Some(GemmDtype::F32),
        _ => None,
    }
}

/// How a row-major `rows x cols` matrix with strides `(s_row, s_col)` reads in column-major
/// terms, or `None` where cuBLAS cannot address it (overlapping or doubly strided).
fn operand_layout(rows: usize, cols: usize, s_row: usize, s_col: usize) -> Option<Operand> {
    let (r, c) = (rows as u64, cols as u64);
    if (s_col == 1 || cols == 1) && (rows == 1 || s_row >= cols.max(1)) {
        // Row-major memory is X^T in column-major: stored cols x rows, read as is.
        let ld = if rows == 1 { c.max(1) } else { s_row as u64 };
        return Some(Operand {
            ptr: 0,
            rows: c,
            cols: r,
            ld: ld as i64,
            batch_stride: 0,
            transposed: false,
        });
    }
    if (s_row == 1 || rows == 1) && (cols == 1 || s_col >= rows.max(1)) {
        // A transposed view: column-major X, read through op = T.
        let ld = if cols == 1 { r.max(1) } else { s_col as u64 };
        return Some(Operand {
            ptr: 0,
            rows: r,
            cols: c,
            ld: ld as i64,
            batch_stride: 0,
            transposed: true,
        });
    }
    None
}

/// The layout of a rank-3 tensor's matrices, copying it to contiguous memory only where its
/// strides cannot be described to cuBLAS.
fn prepare(tensor: CubeTensor<CudaRuntime>) -> (CubeTensor<CudaRuntime>, Operand) {
    let describe = |t: &CubeTensor<CudaRuntime>| {
        let shape = t.meta.shape();
        let strides = t.meta.strides();
        operand_layout(shape[1], shape[2], strides[1], strides[2]).map(|mut op| {
            op.batch_stride = if shape[0] == 1 { 0 } else { strides[0] as i64 };
            op
        })
    };
    if let Some(op) = describe(&tensor) {
        return (tensor, op);
    }
    let tensor = into_contiguous(tensor);
    let op = describe(&tensor).expect("a contiguous rank-3 tensor is always addressable");
    (tensor, op)
}

/// `lhs [b|1, m, k] @ rhs [b|1, k, n]` through cuBLAS; `Err` where it does not apply.
/// The `Err` hands both operands back (large, by value) so the caller can fall back to burn.
#[allow(clippy::result_large_err)]
pub fn cublas_matmul(
    lhs: CubeTensor<CudaRuntime>,
    rhs: CubeTensor<CudaRuntime>,
) -> Result<CubeTensor<CudaRuntime>, (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>)> {
    let lhs_shape = lhs.meta.shape().clone();
    let rhs_shape = rhs.meta.shape().clone();
    let dtype = match gemm_dtype(lhs.dtype) {
        Some(d) if lhs.dtype == rhs.dtype => d,
        _ => return Err((lhs, rhs)),
    };
    if lhs_shape.num_dims() != 3 || rhs_shape.num_dims() != 3 || lhs_shape[2] != rhs_shape[1] {
        return Err((lhs, rhs));
    }
    let (bl, m, k) = (lhs_shape[0], lhs_shape[1], lhs_shape[2]);
    let (br, n) = (rhs_shape[0], rhs_shape[2]);
    if bl != br && bl != 1 && br != 1 {
        return Err((lhs, rhs));
    }
    let batch = bl.max(br);
    if batch == 0
        || m == 0
        || n == 0
        || k == 0
        || batch > i32::MAX as usize
        || !super::worth_cublas(batch, m, k, n)
    {
        return Err((lhs, rhs));
    }

    let (lhs, mut a_row) = prepare(lhs);
    let (rhs, mut b_row) = prepare(rhs);
    let client = lhs.client.clone();
    let device = lhs.device.clone();
    let out_handle = client.empty(batch * m * n * dtype.size());
    let out = CubeTensor::new_contiguous(
        client.clone(),
        device.clone(),
        Shape::new([batch, m, n]),
        out_handle,
        lhs.dtype,
    );

    let resources = (
        client.get_resource(lhs.handle.clone()),
        client.get_resource(rhs.handle.clone()),
        client.get_resource(out.handle.clone()),
    );
    let (ra, rb, rd) = match resources {
        (Ok(a), Ok(b), Ok(d)) => (a, b, d),
        _ => return Err((lhs, rhs)),
    };
    a_row.ptr = ra.resource().ptr;
    b_row.ptr = rb.resource().ptr;
    // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's A is our rhs, its B our lhs.
    let gemm = Gemm {
        dtype,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        batch: batch as i32,
        a: b_row,
        b: a_row,
        d_ptr: rd.resource().ptr,
        ldd: n as i64,
        d_batch_stride: (m * n) as i64,
    };
    // `get_resource` made the output's stream wait for whatever stream wrote the operands, so
    // queuing there orders the GEMM after its inputs and before every later kernel that reads
    // its output or reuses the operands' memory.
    let stream = rd.resource().stream;
    let ran = cublas::with_state(device.index, |state| {
        // SAFETY: the pointers are live cubecl allocations of the described sizes; see above
        // for the ordering.
        unsafe { state.enqueue(stream, &gemm) }
    });
    drop((ra, rb, rd));
    match ran {
        Ok(()) => Ok(out),
        Err(err) => {
            // A failed cuBLAS call (library missing, unsupported layout) falls back to burn.
            log_fallback(&err);
            Err((lhs, rhs))
        }
    }
}

fn log_fallback(err: &Error) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("runner backend: cuBLAS unavailable, using burn's matmul ({err})");
    }
}

fn log_attention_fallback(err: &Error) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("runner backend: fused attention kernel failed, using composed ops ({err})");
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FastOps for Cube<F, I, BT> {
    fn accelerator_memory_used() -> Option<usize> {
        super::device_memory_used(0).ok()
    }

    fn fused_attention_supported(dtype: DType, head_dim: usize) -> bool {
        flash::available(dtype, head_dim)
    }

    fn fast_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_valid: Option<IntTensor<Self>>,
        spec: FusedAttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if flash::available(q.dtype, q.shape()[3]) {
            match flash::forward(q.clone(), k.clone(), v.clone(), key_valid.clone(), spec) {
                Ok(out) => return out,
                Err(e) => log_attention_fallback(&e),
            }
        }
        reference_forward_primitive::<Self>(q, k, v, key_valid, spec)
    }

    fn fast_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        key_valid: Option<IntTensor<Self>>,
        spec: FusedAttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if flash::available(q.dtype, q.shape()[3]) && dout.dtype == DType::BF16 {
            let run = flash::backward::<F, I, BT>(
                q.clone(),
                k.clone(),
                v.clone(),
                o.clone(),
                lse.clone(),
                dout.clone(),
                key_valid.clone(),
                spec,
            );
            match run {
                Ok(grads) => return grads,
                Err(e) => log_attention_fallback(&e),
            }
        }
        reference_backward_primitive::<Self>(q, k, v, o, lse, dout, key_valid, spec)
    }

    fn fast_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        match cublas_matmul(lhs, rhs) {
            Ok(out) => out,
            Err((lhs, rhs)) => {
                <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_matmul(lhs, rhs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::operand_layout;

    #[test]
    fn row_major_and_transposed_views_are_described_without_copies() {
        // Contiguous 3x4: column-major 4x3, ld 4, no transpose.
        let op = operand_layout(3, 4, 4, 1).unwrap();
        assert_eq!((op.rows, op.cols, op.ld, op.transposed), (4, 3, 4, false));
        // Transpose of a contiguous 4x3 (a 3x4 view with strides (1, 3)).
        let op = operand_layout(3, 4, 1, 3).unwrap();
        assert_eq!((op.rows, op.cols, op.ld, op.transposed), (3, 4, 3, true));
        // A column slice of a wider matrix keeps its parent's leading dimension.
        let op = operand_layout(3, 4, 10, 1).unwrap();
        assert_eq!(op.ld, 10);
        // Doubly strided or overlapping layouts are refused.
        assert!(operand_layout(3, 4, 8, 2).is_none());
        assert!(operand_layout(3, 4, 0, 1).is_none());
    }
}
