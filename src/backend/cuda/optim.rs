//! The fused AdamW update (`optim.cu`) on burn-cuda tensors: one kernel per parameter in place
//! of about twenty burn operations (see `crate::backend::adamw`).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor};
use cubecl::cuda::CudaRuntime;
use cudarc::driver::sys as drv_sys;

use crate::backend::adamw::AdamwStep;
use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::Error;

type CT = CubeTensor<CudaRuntime>;

const SOURCE: &str = include_str!("optim.cu");
const THREADS: u32 = 256;
/// Blocks at most (a grid-stride loop covers the rest): enough to fill an H100 many times.
const MAX_BLOCKS: usize = 4096;

/// The two instantiations: gradient in bf16, gradient in f32.
struct Kernels([drv_sys::CUfunction; 2]);

// SAFETY: CUfunction handles are plain driver handles, valid in every thread of the process.
unsafe impl Send for Kernels {}

static KERNELS: OnceLock<Mutex<HashMap<usize, Result<Kernels, String>>>> = OnceLock::new();

fn kernel(ordinal: usize, grad_dtype: DType) -> Result<drv_sys::CUfunction, Error> {
    let all = KERNELS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = all.lock().map_err(|_| Error::Poisoned)?;
    let entry = guard.entry(ordinal).or_insert_with(|| {
        crate::backend::cuda::cublas::with_state(ordinal, |_| {
            let module = nvrtc::load_module(ordinal, SOURCE, "optim.cu", Vec::new())?;
            Ok(Kernels([
                nvrtc::function(module, "runner_adamw_grad_bf16", 0)?,
                nvrtc::function(module, "runner_adamw_grad_f32", 0)?,
            ]))
        })
        .map_err(|e| e.to_string())
    });
    match entry {
        Ok(k) => Ok(k.0[usize::from(grad_dtype == DType::F32)]),
        Err(e) => Err(Error::Cuda {
            call: "AdamW kernel",
            detail: e.clone(),
        }),
    }
}

/// Whether the kernel takes these types: f32 weights, moments and scale, a bf16 or f32
/// gradient, and no low copy or a bf16 one.
pub fn supported(
    weights: DType,
    moments: [DType; 2],
    grad: DType,
    scale: Option<DType>,
    low: Option<FloatDType>,
) -> bool {
    weights == DType::F32
        && moments == [DType::F32; 2]
        && matches!(grad, DType::BF16 | DType::F32)
        && matches!(scale, None | Some(DType::F32))
        && matches!(low, None | Some(FloatDType::BF16))
}

fn empty_like(like: &CT, n: usize, dtype: DType) -> CT {
    let handle = like.client.empty(n * dtype.size());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::new([n]),
        handle,
        dtype,
    )
}

/// The update on 1-D tensors of one length (see [`supported`] for the types): new weights,
/// moments and the bf16 copy when `low` asks for it. `Err` when the kernel cannot load here
/// (nothing queued; the caller computes the composed update).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    weights: CT,
    grad: CT,
    exp_avg: CT,
    exp_avg_sq: CT,
    grad_scale: Option<CT>,
    hp: AdamwStep,
    low: Option<FloatDType>,
) -> Result<(CT, CT, CT, Option<CT>), Error> {
    let n = weights.meta.shape().num_elements();
    for (what, t) in [
        ("grad", &grad),
        ("exp_avg", &exp_avg),
        ("exp_avg_sq", &exp_avg_sq),
    ] {
        let len = t.meta.shape().num_elements();
        if len != n {
            return Err(Error::Shape {
                op: "adamw",
                what,
                expected: format!("{n} elements, as the weights"),
                got: len.to_string(),
            });
        }
    }
    let ordinal = weights.device.index;
    let function = kernel(ordinal, grad.dtype)?;
    let [weights, grad, exp_avg, exp_avg_sq] =
        [weights, grad, exp_avg, exp_avg_sq].map(into_contiguous);
    let grad_scale = grad_scale.map(into_contiguous);
    let w_out = empty_like(&weights, n, DType::F32);
    let m_out = empty_like(&weights, n, DType::F32);
    let v_out = empty_like(&weights, n, DType::F32);
    let low_out = low.map(|_| empty_like(&weights, n, DType::BF16));

    // Pointer order: inputs, then outputs ending in v_out (the stream to queue on).
    let mut handles = vec![
        weights.handle.clone(),
        grad.handle.clone(),
        exp_avg.handle.clone(),
        exp_avg_sq.handle.clone(),
    ];
    let has_scale = grad_scale.is_some();
    handles.extend(grad_scale.as_ref().map(|s| s.handle.clone()));
    handles.push(w_out.handle.clone());
    handles.extend(low_out.as_ref().map(|l| l.handle.clone()));
    handles.push(m_out.handle.clone());
    handles.push(v_out.handle.clone());
    let has_low = low_out.is_some();

    let scalar = |x: f64| x as f32;
    let decay = scalar(1.0 - hp.lr * hp.weight_decay);
    let (beta1, one_minus_beta1) = (scalar(hp.beta1), scalar(1.0 - hp.beta1));
    let (beta2, one_minus_beta2) = (scalar(hp.beta2), scalar(1.0 - hp.beta2));
    let step_size = scalar(hp.lr / hp.bias_correction1());
    let sqrt_bc2 = scalar(hp.bias_correction2().sqrt());
    let eps = scalar(hp.eps);
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    nvrtc::launch(
        ordinal,
        &weights.client,
        handles,
        "AdamW",
        function,
        ((blocks, 1, 1), THREADS, 0),
        move |p| {
            let mut next = 0;
            let mut take = || {
                next += 1;
                p[next - 1]
            };
            let (w, g, m, v) = (take(), take(), take(), take());
            let scale = if has_scale { take() } else { 0 };
            let w_out = take();
            let low = if has_low { take() } else { 0 };
            let (m_out, v_out) = (take(), take());
            let mut a = Args::default();
            a.ptr(w).ptr(g).ptr(m).ptr(v).ptr(scale);
            a.ptr(w_out).ptr(low).ptr(m_out).ptr(v_out);
            a.i64(n as i64);
            for x in [
                decay,
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                step_size,
                sqrt_bc2,
                eps,
            ] {
                a.f32(x);
            }
            a
        },
    );
    Ok((w_out, m_out, v_out, low_out))
}
