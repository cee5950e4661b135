//! `FastOps` for burn-cuda's `CubeBackend<CudaRuntime, ..>`: routes batched matmuls to cuBLAS
//! on the tensors' own device memory, reading transposed and strided views without copies.
//!
//! Reference: burn's `examples/custom-cubecl-kernel/src/forward.rs` (v0.21.0) for the
//! CubeTensor plumbing; `crate::backend::cuda::cublas` for the GEMM itself.
//! The GEMM is queued on the CUDA stream that owns the output's memory (cubecl's stream for
//! this thread; `GpuResource::stream` comes from runner's patch of cubecl-cuda, see
//! vendor/cubecl-cuda/RUNNER_PATCH.md), so it runs in order with cubecl's kernels and the host
//! never waits.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType, Shape, Tensor, TensorMetadata, TensorPrimitive,
};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, tensor::CubeTensor, CubeBackend, FloatElement,
    IntElement,
};
use cubecl::cuda::CudaRuntime;

use crate::backend::adamw;
use crate::backend::attention::{reference_backward_primitive, reference_forward_primitive};
use crate::backend::cuda::cublas::{self, Gemm, GemmDtype, Operand};
use crate::backend::cuda::{cross_entropy, flash, nf4, norm, optim, queue, rope};
use crate::backend::lora::{LoraGradients, LoraGrads};
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
pub fn cublas_matmul(lhs: CT, rhs: CT) -> Result<CT, (CT, CT)> {
    cublas_gemm(lhs, rhs, 1.0, None).map_err(|(lhs, rhs, _)| (lhs, rhs))
}

type CT = CubeTensor<CudaRuntime>;

/// `alpha lhs @ rhs`, added into `acc` when given (cuBLAS's beta = 1): `acc` must be a
/// contiguous `[b, m, n]` tensor of the operands' type that nothing else holds, and becomes the
/// output. `Err` hands everything back where cuBLAS does not apply.
#[allow(clippy::result_large_err, clippy::type_complexity)]
fn cublas_gemm(lhs: CT, rhs: CT, alpha: f32, acc: Option<CT>) -> Result<CT, (CT, CT, Option<CT>)> {
    let lhs_shape = lhs.meta.shape().clone();
    let rhs_shape = rhs.meta.shape().clone();
    let dtype = match gemm_dtype(lhs.dtype) {
        Some(d) if lhs.dtype == rhs.dtype => d,
        _ => return Err((lhs, rhs, acc)),
    };
    if lhs_shape.num_dims() != 3 || rhs_shape.num_dims() != 3 || lhs_shape[2] != rhs_shape[1] {
        return Err((lhs, rhs, acc));
    }
    let (bl, m, k) = (lhs_shape[0], lhs_shape[1], lhs_shape[2]);
    let (br, n) = (rhs_shape[0], rhs_shape[2]);
    if bl != br && bl != 1 && br != 1 {
        return Err((lhs, rhs, acc));
    }
    let batch = bl.max(br);
    if batch == 0
        || m == 0
        || n == 0
        || k == 0
        || batch > i32::MAX as usize
        || !super::worth_cublas(batch, m, k, n)
    {
        return Err((lhs, rhs, acc));
    }
    if let Some(t) = &acc {
        let fits = t.dtype == lhs.dtype
            && t.meta.shape().to_vec() == vec![batch, m, n]
            && t.is_contiguous()
            && t.can_mut();
        if !fits {
            return Err((lhs, rhs, acc));
        }
    }

    let (lhs, a_row) = prepare(lhs);
    let (rhs, b_row) = prepare(rhs);
    let client = lhs.client.clone();
    let device = lhs.device.clone();
    if let Err(err) = cublas::ready(device.index) {
        // No cuBLAS here (library missing): burn's matmul it is.
        log_fallback(&err);
        return Err((lhs, rhs, acc));
    }
    let beta = if acc.is_some() { 1.0 } else { 0.0 };
    let out = acc.unwrap_or_else(|| {
        let handle = client.empty(batch * m * n * dtype.size());
        CubeTensor::new_contiguous(
            client.clone(),
            device.clone(),
            Shape::new([batch, m, n]),
            handle,
            lhs.dtype,
        )
    });
    // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's A is our rhs, its B our lhs.
    let gemm = Gemm {
        dtype,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        batch: batch as i32,
        a: b_row,
        b: a_row,
        d_ptr: 0,
        ldd: n as i64,
        d_batch_stride: (m * n) as i64,
        alpha,
        beta,
    };
    let handles = vec![lhs.handle.clone(), rhs.handle.clone(), out.handle.clone()];
    queue::submit(&client, handles, "cuBLAS GEMM", move |r| {
        let mut gemm = gemm;
        gemm.b.ptr = r.ptrs[0];
        gemm.a.ptr = r.ptrs[1];
        gemm.d_ptr = r.ptrs[2];
        cublas::with_state(device.index, |state| {
            // SAFETY: the pointers are live cubecl allocations of the described sizes, held
            // until this returns; the GEMM is queued on the output's stream, after the work that
            // wrote the operands and before any later kernel that reads the output or reuses
            // the operands' memory.
            unsafe { state.enqueue(r.stream, &gemm) }
        })
    });
    Ok(out)
}

/// `alpha op(a) op(b)` for 2-D operands (`op` transposing where asked), added into `acc`
/// (see [`cublas_gemm`]) when given; burn's ops where cuBLAS does not apply.
fn gemm_2d<F: FloatElement, I: IntElement, BT: BoolElement>(
    a: CT,
    b: CT,
    (transpose_a, transpose_b): (bool, bool),
    alpha: f64,
    acc: Option<CT>,
) -> CT {
    type T<F, I, BT> = Tensor<Cube<F, I, BT>, 3>;
    let lift = |t: CT, transpose: bool| {
        let [rows, cols] = [t.meta.shape()[0], t.meta.shape()[1]];
        let t = T::<F, I, BT>::from_primitive(TensorPrimitive::Float(t)).reshape([1, rows, cols]);
        let t = if transpose { t.swap_dims(1, 2) } else { t };
        t.into_primitive().tensor()
    };
    let (a3, b3) = (lift(a, transpose_a), lift(b, transpose_b));
    let acc3 = acc.map(|t| lift(t, false));
    let out = match cublas_gemm(a3, b3, alpha as f32, acc3) {
        Ok(out) => T::<F, I, BT>::from_primitive(TensorPrimitive::Float(out)),
        Err((a3, b3, acc3)) => {
            let float = |t: CT| T::<F, I, BT>::from_primitive(TensorPrimitive::Float(t));
            let product = float(a3).matmul(float(b3)).mul_scalar(alpha);
            match acc3 {
                Some(acc) => float(acc).add(product),
                None => product,
            }
        }
    };
    let [_, rows, cols] = out.dims();
    out.reshape([rows, cols]).into_primitive().tensor()
}

/// Prints `what` and `err` the first time `warned` is seen unset.
fn warn_once(warned: &AtomicBool, what: &str, err: &Error) {
    if !warned.swap(true, Ordering::Relaxed) {
        eprintln!("runner backend: {what} ({err})");
    }
}

fn log_fallback(err: &Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    warn_once(&WARNED, "cuBLAS unavailable, using burn's matmul", err);
}

fn log_attention_fallback(err: &Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    warn_once(
        &WARNED,
        "fused attention kernel failed, using composed ops",
        err,
    );
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FastOps for Cube<F, I, BT> {
    fn accelerator_memory_used() -> Option<usize> {
        super::device_memory_used(0).ok()
    }

    /// Queues the copy to host memory on the tensor's stream and returns at once: the copy
    /// overlaps the kernels queued after it, and the device buffer goes when it is done.
    fn fast_offload(x: FloatTensor<Self>) -> crate::backend::offload::Offloaded<Self> {
        let x = burn_cubecl::kernel::into_contiguous_aligned(x);
        let device = x.device.clone();
        let (shape, strides) = (x.meta.shape().clone(), x.meta.strides().clone());
        let dtype = x.dtype;
        let copy = cubecl::server::CopyDescriptor::new(
            x.handle.clone().binding(),
            shape.clone(),
            strides,
            x.elem_size(),
        );
        let read = x.client.read_tensor_detached(vec![copy]);
        drop(x);
        crate::backend::offload::Offloaded::pending(
            Box::pin(async move {
                let mut bytes = read.await.map_err(|e| format!("{e}"))?;
                let bytes = bytes.pop().ok_or("the read returned nothing")?;
                Ok(burn::tensor::TensorData::from_bytes(bytes, shape, dtype))
            }),
            device,
        )
    }

    fn fast_copy_to_device(x: FloatTensor<Self>, dst: u64) -> bool {
        let x = burn_cubecl::kernel::into_contiguous(x);
        let bytes = x.meta.shape().num_elements() * x.dtype.size();
        let ordinal = x.device.index;
        let client = x.client.clone();
        queue::submit(
            &client,
            vec![x.handle.clone()],
            "copy to the decode engine",
            move |r| {
                cublas::with_state(ordinal, |_| {
                    // SAFETY: `dst` holds `bytes` (the caller's contract); the source is the live
                    // tensor, read in order on its stream.
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(dst, r.ptrs[0], bytes, r.stream)
                    }
                    .map_err(|e| Error::Cuda {
                        call: "cuMemcpyDtoDAsync",
                        detail: format!("{e:?}"),
                    })
                })
            },
        );
        true
    }

    fn accelerator_memory_peak() -> Option<usize> {
        Some(cubecl::cuda::peak_bytes_in_use() as usize)
    }

    fn reset_accelerator_memory_peak() {
        cubecl::cuda::reset_peak_bytes_in_use();
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

    fn fast_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let y = gemm_2d::<F, I, BT>(x.clone(), weight, (false, true), 1.0, None);
        let u = gemm_2d::<F, I, BT>(x, a, (false, true), 1.0, None);
        gemm_2d::<F, I, BT>(u, b, (false, true), scale, Some(y))
    }

    fn fast_lora_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
        dy: FloatTensor<Self>,
        wanted: LoraGrads,
    ) -> LoraGradients<Self> {
        let gemm = gemm_2d::<F, I, BT>;
        // t = dy B, shared by dx and dA.
        let t = (wanted.x || wanted.a).then(|| gemm(dy.clone(), b, (false, false), 1.0, None));
        let dx = wanted.x.then(|| {
            let base = gemm(dy.clone(), weight, (false, false), 1.0, None);
            gemm(
                t.clone().expect("t"),
                a.clone(),
                (false, false),
                scale,
                Some(base),
            )
        });
        let da = wanted
            .a
            .then(|| gemm(t.expect("t"), x.clone(), (true, false), scale, None));
        let db = wanted.b.then(|| {
            let u = gemm(x.clone(), a, (false, true), 1.0, None);
            gemm(dy.clone(), u, (true, false), scale, None)
        });
        let dw = wanted.weight.then(|| gemm(dy, x, (true, false), 1.0, None));
        LoraGradients {
            x: dx,
            weight: dw,
            a: da,
            b: db,
        }
    }

    fn fast_nf4_dequantize(parts: crate::backend::nf4::Nf4Parts<Self>) -> FloatTensor<Self> {
        let n = parts.shape[0] * parts.shape[1];
        if nf4::supported(
            &parts.packed,
            &parts.absmax_codes,
            &parts.absmax_scales,
            &parts.code,
            &parts.dynamic,
            n,
        ) {
            match nf4::ready(parts.packed.device.index) {
                // Checked types and lengths: the kernel call cannot refuse them.
                Ok(()) => {
                    return nf4::dequantize(
                        parts.packed,
                        parts.absmax_codes,
                        parts.absmax_scales,
                        parts.code,
                        parts.dynamic,
                        parts.offset,
                        parts.shape,
                    )
                    .expect("supported NF4 tensors")
                }
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    warn_once(&WARNED, "NF4 kernel unavailable, using burn's ops", &e);
                }
            }
        }
        crate::backend::nf4::composed::<Self>(parts)
    }

    fn fast_rms_norm_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if norm::supported(&x, &weight) {
            match norm::ready(x.device.index) {
                // Checked types and shapes: the kernel call cannot refuse them.
                Ok(()) => return norm::forward(x, weight, eps).expect("supported RMSNorm input"),
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    warn_once(&WARNED, "RMSNorm kernel unavailable, using burn's ops", &e);
                }
            }
        }
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let weight = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(weight));
        let f32_inv = matches!(x.dtype(), DType::BF16 | DType::F32);
        let (y, inv) = crate::backend::dispatch::composed_rms_norm(x, weight, eps);
        // The kernel's type for the inverse RMS, whichever path ran (the fusion layer relies
        // on it).
        let inv = if f32_inv {
            inv.cast(burn::tensor::FloatDType::F32)
        } else {
            inv
        };
        (y.into_primitive().tensor(), inv.into_primitive().tensor())
    }

    fn fast_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        (want_x, want_w): (bool, bool),
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let kernel = want_x
            && norm::supported(&x, &weight)
            && inv_rms.dtype == DType::F32
            && dy.dtype == x.dtype
            && norm::ready(x.device.index).is_ok();
        if !kernel {
            return crate::backend::dispatch::composed_rms_norm_backward::<Self>(
                x,
                weight,
                inv_rms,
                dy,
                (want_x, want_w),
            );
        }
        // The weight's gradient (full fine-tuning only) from burn's ops, the input's from the
        // kernel.
        let (_, dw) = if want_w {
            crate::backend::dispatch::composed_rms_norm_backward::<Self>(
                x.clone(),
                weight.clone(),
                inv_rms.clone(),
                dy.clone(),
                (false, true),
            )
        } else {
            (None, None)
        };
        let dx = norm::backward_x(x, weight, inv_rms, dy).expect("supported RMSNorm input");
        (Some(dx), dw)
    }

    fn fast_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        backward: bool,
    ) -> FloatTensor<Self> {
        if rope::supported(&x, &cos, &sin) {
            match rope::ready(x.device.index) {
                // Checked types and shapes: the kernel call cannot refuse them.
                Ok(()) => return rope::rope(x, cos, sin, backward).expect("supported RoPE input"),
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    warn_once(&WARNED, "RoPE kernel unavailable, using burn's ops", &e);
                }
            }
        }
        crate::backend::dispatch::composed_rope_primitive::<Self>(x, cos, sin, backward)
    }

    fn fast_cross_entropy_rows(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        inv_count: FloatTensor<Self>,
        want_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let fits = cross_entropy::supported(logits.dtype, labels.dtype, inv_count.dtype)
            && logits.meta.shape().num_dims() == 2
            && logits.meta.shape()[0] > 0;
        if fits {
            match cross_entropy::ready(logits.device.index) {
                // Owned inputs, so the gradient can take the logits' memory; checked types and
                // shapes: the kernel call cannot refuse them.
                Ok(()) => {
                    return cross_entropy::ce_rows(logits, labels, inv_count, want_grad)
                        .expect("a supported chunk of logits")
                }
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    warn_once(
                        &WARNED,
                        "cross-entropy kernel unavailable, using burn's ops",
                        &e,
                    );
                }
            }
        }
        crate::backend::cross_entropy::rows_reference_primitive::<Self>(
            logits, labels, inv_count, want_grad,
        )
    }

    fn fast_adamw_many(
        params: Vec<adamw::AdamwTensors<FloatTensor<Self>>>,
        grad_scale: Option<FloatTensor<Self>>,
    ) -> Vec<adamw::AdamwUpdated<FloatTensor<Self>>> {
        // One kernel group per (gradient type, betas, eps); the rest composed, one by one.
        let key = |p: &adamw::AdamwTensors<FloatTensor<Self>>| {
            let fits = optim::supported(
                p.weights.dtype,
                [p.exp_avg.dtype, p.exp_avg_sq.dtype],
                p.grad.dtype,
                grad_scale.as_ref().map(|s| s.dtype),
                p.low,
            );
            fits.then(|| {
                (
                    p.grad.dtype == DType::F32,
                    p.hp.beta1.to_bits(),
                    p.hp.beta2.to_bits(),
                    p.hp.eps.to_bits(),
                )
            })
        };
        let n = params.len();
        let mut out: Vec<Option<adamw::AdamwUpdated<FloatTensor<Self>>>> =
            (0..n).map(|_| None).collect();
        let mut groups: Vec<(_, Vec<usize>, Vec<_>)> = Vec::new();
        let mut composed = Vec::new();
        for (index, p) in params.into_iter().enumerate() {
            match key(&p) {
                Some(k) => match groups.iter_mut().find(|(gk, _, _)| *gk == k) {
                    Some((_, at, ps)) => {
                        at.push(index);
                        ps.push(p);
                    }
                    None => groups.push((k, vec![index], vec![p])),
                },
                None => composed.push((index, p)),
            }
        }
        for (_, at, ps) in groups {
            let updated = match optim::kernels_ready(ps[0].weights.device.index) {
                // A uniform group of supported types: the kernel call cannot refuse it.
                Ok(()) => optim::adamw_many(ps, grad_scale.clone())
                    .expect("a uniform group of tensors of one length each"),
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    warn_once(&WARNED, "AdamW kernel unavailable, using composed ops", &e);
                    adamw::composed_many::<Self>(ps, grad_scale.clone())
                }
            };
            for (index, u) in at.into_iter().zip(updated) {
                out[index] = Some(u);
            }
        }
        let (at, ps): (Vec<usize>, Vec<_>) = composed.into_iter().unzip();
        for (index, u) in at
            .into_iter()
            .zip(adamw::composed_many::<Self>(ps, grad_scale))
        {
            out[index] = Some(u);
        }
        out.into_iter()
            .map(|u| u.expect("every parameter updated"))
            .collect()
    }

    fn fast_sum_squares(
        tensors: Vec<FloatTensor<Self>>,
        device: &Self::Device,
    ) -> FloatTensor<Self> {
        let readable = tensors.iter().any(|t| t.meta.shape().num_elements() > 0)
            && tensors.iter().all(|t| optim::squares_supported(t.dtype));
        if readable {
            match optim::kernels_ready(device.index) {
                // Supported types and at least one element: the kernel call cannot refuse them.
                Ok(()) => {
                    return optim::sum_squares(tensors).expect("non-empty bf16 or f32 tensors");
                }
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    warn_once(
                        &WARNED,
                        "sum-of-squares kernel unavailable, using burn's ops",
                        &e,
                    );
                }
            }
        }
        adamw::composed_sum_squares::<Self>(tensors, device)
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
