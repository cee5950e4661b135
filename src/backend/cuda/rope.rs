//! Rotary position embedding and its gradient (`rope.cu`) on burn-cuda tensors: one kernel in
//! place of the two slices, the concatenation and three products of `rotate_half`, and the
//! output keeps the input's memory order (the query and key projections arrive as transposed
//! views), so no copy follows in either direction.

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;

use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::Error;

type CT = CubeTensor<CudaRuntime>;

const SOURCE: &str = concat!(include_str!("bf16.cuh"), include_str!("rope.cu"));
const NAMES: [&str; 2] = ["runner_rope_bf16", "runner_rope_f32"];
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 8192;

/// Whether the kernels load on device `ordinal` (compiled on the first call).
pub fn ready(ordinal: usize) -> Result<(), Error> {
    nvrtc::kernels(ordinal, SOURCE, "rope.cu", &[], &NAMES).map(|_| ())
}

/// Whether the kernel takes `x [b, h, t, d]` and `cos`, `sin [1 | b, 1, t, d]`: bf16 or f32 of
/// one type, an even head size, the last axes contiguous.
pub fn supported(x: &CT, cos: &CT, sin: &CT) -> bool {
    let xs = x.meta.shape().as_slice();
    let cs = cos.meta.shape().as_slice();
    xs.len() == 4
        && matches!(x.dtype, DType::BF16 | DType::F32)
        && cos.dtype == x.dtype
        && sin.dtype == x.dtype
        && xs[3].is_multiple_of(2)
        && xs[3] > 0
        && cs.len() == 4
        && sin.meta.shape().as_slice() == cs
        && (cs[0] == 1 || cs[0] == xs[0])
        && cs[1] == 1
        && cs[2] == xs[2]
        && cs[3] == xs[3]
        && x.meta.strides()[3] == 1
        && cos.meta.strides()[3] == 1
        && sin.meta.strides()[3] == 1
        && cos.meta.strides() == sin.meta.strides()
        && xs.iter().all(|&n| n <= i32::MAX as usize)
}

/// The strides of a dense tensor laid out in `strides`' order (outermost = largest stride),
/// or `None` when that order would not keep the last axis innermost.
fn dense_in_order(shape: &[usize], strides: &[usize]) -> Option<Vec<usize>> {
    let mut order: Vec<usize> = (0..shape.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(strides[i]), i));
    let mut out = vec![0; shape.len()];
    let mut next = 1;
    for &i in order.iter().rev() {
        out[i] = next;
        next *= shape[i];
    }
    (out.last() == Some(&1)).then_some(out)
}

/// `x cos + rotate_half(x) sin`, or with `backward` the gradient of that for `x` given `x` =
/// the output's gradient. The result has `x`'s memory order where that keeps the head axis
/// innermost, else it is contiguous.
pub fn rope(x: CT, cos: CT, sin: CT, backward: bool) -> Result<CT, Error> {
    let ordinal = x.device.index;
    let function = nvrtc::kernels(ordinal, SOURCE, "rope.cu", &[], &NAMES)?.0
        [usize::from(x.dtype == DType::F32)];
    let dims: Vec<usize> = x.meta.shape().as_slice().to_vec();
    let [b, h, t, d] = [dims[0], dims[1], dims[2], dims[3]];
    let shape = Shape::new([b, h, t, d]);
    let handle = x.client.empty(shape.num_elements() * x.dtype.size());
    let mut y =
        CubeTensor::new_contiguous(x.client.clone(), x.device.clone(), shape, handle, x.dtype);
    if let Some(strides) = dense_in_order(&dims, x.meta.strides()) {
        for (slot, s) in y.meta.strides_mut().iter_mut().zip(strides) {
            *slot = s;
        }
    }
    let stride3 = |t: &CT| {
        let s = t.meta.strides();
        [s[0] as i64, s[1] as i64, s[2] as i64]
    };
    let (xs, ys) = (stride3(&x), stride3(&y));
    let cos_dims = cos.meta.shape().as_slice().to_vec();
    let cb = if cos_dims[0] == 1 {
        0
    } else {
        cos.meta.strides()[0] as i64
    };
    let ct = cos.meta.strides()[2] as i64;
    let pairs = b * h * t * (d / 2);
    let blocks = pairs.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    let handles = vec![
        x.handle.clone(),
        cos.handle.clone(),
        sin.handle.clone(),
        y.handle.clone(),
    ];
    nvrtc::launch(
        ordinal,
        &y.client,
        handles,
        "RoPE",
        function,
        ((blocks, 1, 1), THREADS, 0),
        move |p| {
            let mut a = Args::default();
            a.ptr(p[0]).ptr(p[1]).ptr(p[2]).ptr(p[3]);
            for n in [b, h, t, d] {
                a.i32(n as i32);
            }
            for s in [xs, ys].concat() {
                a.i64(s);
            }
            a.i64(cb).i64(ct).i32(i32::from(backward));
            a
        },
    );
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::dense_in_order;

    #[test]
    fn outputs_keep_a_transposed_views_memory_order() {
        // [b, t, h, d] memory seen as [b, h, t, d] (swap_dims(1, 2)).
        let (b, t, h, d) = (2, 5, 3, 4);
        let strides = [t * h * d, d, h * d, 1];
        assert_eq!(
            dense_in_order(&[b, h, t, d], &strides),
            Some(strides.to_vec())
        );
        // Contiguous stays contiguous.
        let contiguous = [h * t * d, t * d, d, 1];
        assert_eq!(
            dense_in_order(&[b, h, t, d], &contiguous),
            Some(contiguous.to_vec())
        );
    }
}
