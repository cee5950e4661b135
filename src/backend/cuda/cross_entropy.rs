//! The cross-entropy rows of a chunk of logits and their gradient (`cross_entropy.cu`) on
//! burn-cuda tensors: one kernel in place of about ten burn operations over the chunk, which
//! read the `[rows, vocab]` logits several times each (see `crate::backend::cross_entropy`).

use burn::tensor::{DType, Shape};
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor};
use cubecl::cuda::CudaRuntime;
use cudarc::driver::sys as drv_sys;

use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::Error;

type CT = CubeTensor<CudaRuntime>;

const SOURCE: &str = concat!(include_str!("bf16.cuh"), include_str!("cross_entropy.cu"));
/// Threads a block (one block a row); `THREADS` in the .cu file.
const THREADS: u32 = 512;

fn kernel(ordinal: usize, f32_logits: bool) -> Result<drv_sys::CUfunction, Error> {
    let names = ["runner_ce_rows_bf16", "runner_ce_rows_f32"];
    let k = nvrtc::kernels(ordinal, SOURCE, "cross_entropy.cu", &[], &names)?;
    Ok(k.0[usize::from(f32_logits)])
}

/// Whether the kernels load on device `ordinal` (compiled on the first call).
pub fn ready(ordinal: usize) -> Result<(), Error> {
    kernel(ordinal, false).map(|_| ())
}

/// Whether the kernel takes these types: bf16 or f32 logits, i32 targets, an f32 scale.
pub fn supported(logits: DType, targets: DType, inv_count: DType) -> bool {
    matches!(logits, DType::BF16 | DType::F32) && targets == DType::I32 && inv_count == DType::F32
}

/// Per-row losses `[rows]` (f32) of `logits [rows, vocab]` against `targets [rows]` (negative:
/// ignored), and with `want_grad` the gradient of `sum(losses) * inv_count` for the logits,
/// in their type and shape (written over the logits' memory when nothing else holds it).
/// `Err` when the kernel cannot load here or the inputs do not fit (nothing queued).
pub fn ce_rows(
    logits: CT,
    targets: CT,
    inv_count: CT,
    want_grad: bool,
) -> Result<(CT, Option<CT>), Error> {
    let dims = logits.meta.shape().clone();
    let (rows, vocab) = match dims.as_slice() {
        [rows, vocab] => (*rows, *vocab),
        _ => {
            return Err(Error::Shape {
                op: "cross_entropy_rows",
                what: "logits",
                expected: "[rows, vocab]".into(),
                got: format!("{dims:?}"),
            })
        }
    };
    let target_len = targets.meta.shape().num_elements();
    if target_len != rows || inv_count.meta.shape().num_elements() != 1 {
        return Err(Error::Shape {
            op: "cross_entropy_rows",
            what: "targets",
            expected: format!("{rows} targets and one scale"),
            got: format!("{target_len} targets"),
        });
    }
    if !supported(logits.dtype, targets.dtype, inv_count.dtype) || vocab > i32::MAX as usize {
        return Err(Error::Shape {
            op: "cross_entropy_rows",
            what: "types",
            expected: "bf16 or f32 logits, i32 targets, an f32 scale".into(),
            got: format!(
                "{:?}, {:?}, {:?}",
                logits.dtype, targets.dtype, inv_count.dtype
            ),
        });
    }
    let ordinal = logits.device.index;
    let function = kernel(ordinal, logits.dtype == DType::F32)?;
    if rows == 0 {
        return Err(Error::Shape {
            op: "cross_entropy_rows",
            what: "logits",
            expected: "at least one row".into(),
            got: "none".into(),
        });
    }
    let [logits, targets, inv_count] = [logits, targets, inv_count].map(into_contiguous);
    let loss = {
        let handle = logits.client.empty(rows * DType::F32.size());
        CubeTensor::new_contiguous(
            logits.client.clone(),
            logits.device.clone(),
            Shape::new([rows]),
            handle,
            DType::F32,
        )
    };
    let grad = want_grad.then(|| {
        if logits.can_mut() {
            logits.clone()
        } else {
            let handle = logits.client.empty(rows * vocab * logits.dtype.size());
            CubeTensor::new_contiguous(
                logits.client.clone(),
                logits.device.clone(),
                dims.clone(),
                handle,
                logits.dtype,
            )
        }
    });
    let mut handles = vec![
        logits.handle.clone(),
        targets.handle.clone(),
        inv_count.handle.clone(),
    ];
    let has_grad = grad.is_some();
    handles.extend(grad.as_ref().map(|g| g.handle.clone()));
    handles.push(loss.handle.clone());
    nvrtc::launch(
        ordinal,
        &loss.client,
        handles,
        "cross-entropy rows",
        function,
        ((rows.max(1) as u32, 1, 1), THREADS, 0),
        move |p| {
            let (x, t, scale) = (p[0], p[1], p[2]);
            let (g, out) = if has_grad { (p[3], p[4]) } else { (0, p[3]) };
            let mut a = Args::default();
            a.ptr(x)
                .ptr(g)
                .i64(vocab as i64)
                .i32(vocab as i32)
                .ptr(t)
                .ptr(scale)
                .ptr(out);
            a
        },
    );
    Ok((loss, grad))
}
