//! NF4 dequantization (`nf4.cu`) on burn-cuda tensors: one kernel from the packed words to the
//! dense weight, in place of the composed form's unpacked 32-bit nibbles and gathers.

use burn::tensor::{DType, Shape};
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor};
use cubecl::cuda::CudaRuntime;

use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::Error;

type CT = CubeTensor<CudaRuntime>;

const SOURCE: &str = concat!(include_str!("bf16.cuh"), include_str!("nf4.cu"));
const NAMES: [&str; 2] = ["runner_nf4_dequantize_bf16", "runner_nf4_dequantize_f32"];
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 16384;

/// Whether the kernels load on device `ordinal` (compiled on the first call).
pub fn ready(ordinal: usize) -> Result<(), Error> {
    nvrtc::kernels(ordinal, SOURCE, "nf4.cu", &[], &NAMES).map(|_| ())
}

/// Whether the kernel takes these tensors: 32-bit words, bf16 or f32 tables of one type, and
/// as many words as `n` values need.
pub fn supported(packed: &CT, codes: &CT, scales: &CT, code: &CT, dynamic: &CT, n: usize) -> bool {
    let len = |t: &CT| t.meta.shape().num_elements();
    let blocks = n.div_ceil(64);
    matches!(code.dtype, DType::BF16 | DType::F32)
        && scales.dtype == code.dtype
        && dynamic.dtype == code.dtype
        && matches!(packed.dtype, DType::I32 | DType::U32)
        && codes.dtype == packed.dtype
        && len(packed) >= n.div_ceil(8)
        && len(codes) >= blocks.div_ceil(4)
        && len(scales) >= blocks.div_ceil(256)
        && len(code) == 16
        && len(dynamic) == 256
}

/// The dense `[out, in]` weight in the tables' type (see [`supported`]).
pub fn dequantize(
    packed: CT,
    codes: CT,
    scales: CT,
    code: CT,
    dynamic: CT,
    offset: f64,
    shape: [usize; 2],
) -> Result<CT, Error> {
    let [packed, codes, scales, code, dynamic] =
        [packed, codes, scales, code, dynamic].map(into_contiguous);
    let ordinal = packed.device.index;
    let dtype = code.dtype;
    let function =
        nvrtc::kernels(ordinal, SOURCE, "nf4.cu", &[], &NAMES)?.0[usize::from(dtype == DType::F32)];
    let n = shape[0] * shape[1];
    let dims = Shape::new(shape);
    let handle = packed.client.empty(n * dtype.size());
    let out = CubeTensor::new_contiguous(
        packed.client.clone(),
        packed.device.clone(),
        dims,
        handle,
        dtype,
    );
    // The offset as the composed form adds it: a scalar in the tables' type.
    let offset = match dtype {
        DType::BF16 => half::bf16::from_f64(offset).to_f32(),
        _ => offset as f32,
    };
    let blocks = n
        .div_ceil(8)
        .div_ceil(THREADS as usize)
        .clamp(1, MAX_BLOCKS) as u32;
    let handles = vec![
        packed.handle.clone(),
        codes.handle.clone(),
        scales.handle.clone(),
        code.handle.clone(),
        dynamic.handle.clone(),
        out.handle.clone(),
    ];
    nvrtc::launch(
        ordinal,
        &out.client,
        handles,
        "NF4 dequantization",
        function,
        ((blocks, 1, 1), THREADS, 0),
        move |p| {
            let mut a = Args::default();
            a.ptr(p[0])
                .ptr(p[1])
                .ptr(p[2])
                .ptr(p[3])
                .ptr(p[4])
                .ptr(p[5]);
            a.i64(n as i64).f32(offset);
            a
        },
    );
    Ok(out)
}
