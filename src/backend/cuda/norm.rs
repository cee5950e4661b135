//! RMSNorm forward and the input's gradient (`norm.cu`) on burn-cuda tensors: one kernel each
//! in place of four or more burn operations (a row reduction that burn launches on a few
//! dozen blocks, and unvectorized broadcasts), with the inverse RMS kept in f32.

use burn::tensor::{DType, Shape};
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor};
use cubecl::cuda::CudaRuntime;

use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::Error;

type CT = CubeTensor<CudaRuntime>;

const SOURCE: &str = concat!(include_str!("bf16.cuh"), include_str!("norm.cu"));
/// Rows a block (a warp each); `ROWS_PER_BLOCK` in the .cu file.
const ROWS_PER_BLOCK: usize = 4;
const NAMES: [&str; 4] = [
    "runner_rms_forward_bf16",
    "runner_rms_forward_f32",
    "runner_rms_backward_bf16",
    "runner_rms_backward_f32",
];

/// Whether the kernels load on device `ordinal` (compiled on the first call).
pub fn ready(ordinal: usize) -> Result<(), Error> {
    nvrtc::kernels(ordinal, SOURCE, "norm.cu", &[], &NAMES).map(|_| ())
}

/// Whether the kernels take `x [rows, h]` and `weight [h]` of these types and shapes.
pub fn supported(x: &CT, weight: &CT) -> bool {
    let dims = x.meta.shape().as_slice();
    matches!(x.dtype, DType::BF16 | DType::F32)
        && weight.dtype == x.dtype
        && dims.len() == 2
        && dims[0] > 0
        && dims[1] > 0
        && weight.meta.shape().num_elements() == dims[1]
        && dims[0] <= i32::MAX as usize
        && dims[1] <= i32::MAX as usize
}

fn empty(like: &CT, shape: Shape, dtype: DType) -> CT {
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    )
}

fn launch(
    x: &CT,
    name: usize,
    handles: Vec<cubecl::server::Handle>,
    args: impl FnOnce(&[u64]) -> Args + Send + 'static,
) -> Result<(), Error> {
    let ordinal = x.device.index;
    let function = nvrtc::kernels(ordinal, SOURCE, "norm.cu", &[], &NAMES)?.0[name];
    let rows = x.meta.shape()[0];
    let blocks = rows.div_ceil(ROWS_PER_BLOCK) as u32;
    nvrtc::launch(
        ordinal,
        &x.client,
        handles,
        "RMSNorm",
        function,
        ((blocks, 1, 1), 32 * ROWS_PER_BLOCK as u32, 0),
        args,
    );
    Ok(())
}

/// `y [rows, h]` in x's type and the inverse RMS `[rows, 1]` in f32 (see [`supported`]).
pub fn forward(x: CT, weight: CT, eps: f64) -> Result<(CT, CT), Error> {
    let [x, weight] = [x, weight].map(into_contiguous);
    let (rows, h) = (x.meta.shape()[0], x.meta.shape()[1]);
    let y = empty(&x, Shape::new([rows, h]), x.dtype);
    let inv = empty(&x, Shape::new([rows, 1]), DType::F32);
    let handles = vec![
        x.handle.clone(),
        weight.handle.clone(),
        y.handle.clone(),
        inv.handle.clone(),
    ];
    launch(&x, usize::from(x.dtype == DType::F32), handles, move |p| {
        let mut a = Args::default();
        a.ptr(p[0]).ptr(p[1]).ptr(p[2]).ptr(p[3]);
        a.i32(rows as i32).i32(h as i32).f32(eps as f32);
        a
    })?;
    Ok((y, inv))
}

/// The gradient of x from `dy` and the forward's inverse RMS (f32, `rows` elements).
pub fn backward_x(x: CT, weight: CT, inv: CT, dy: CT) -> Result<CT, Error> {
    let [x, weight, inv, dy] = [x, weight, inv, dy].map(into_contiguous);
    let (rows, h) = (x.meta.shape()[0], x.meta.shape()[1]);
    let dx = empty(&x, Shape::new([rows, h]), x.dtype);
    let handles = vec![
        x.handle.clone(),
        weight.handle.clone(),
        inv.handle.clone(),
        dy.handle.clone(),
        dx.handle.clone(),
    ];
    launch(
        &x,
        2 + usize::from(x.dtype == DType::F32),
        handles,
        move |p| {
            let mut a = Args::default();
            a.ptr(p[0]).ptr(p[1]).ptr(p[2]).ptr(p[3]).ptr(p[4]);
            a.i32(rows as i32).i32(h as i32);
            a
        },
    )?;
    Ok(dx)
}
