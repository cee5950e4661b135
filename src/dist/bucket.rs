//! Gradients summed across the ranks a bucket at a time: the trainable parameters' gradients, in
//! module order, flattened into buckets of about [`DEFAULT_BUCKET_VALUES`] values (PyTorch DDP's
//! 25 MB), one collective operation per bucket instead of one per parameter.

use std::ops::Range;

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::dist::{Collective, DistError};

/// Values per bucket: 25 MiB of f32.
pub const DEFAULT_BUCKET_VALUES: usize = 25 << 18;

/// Consecutive runs of `sizes` (values per parameter) holding at most `cap` values each; a
/// parameter larger than `cap` is a bucket of its own. Covers every index once, in order.
pub fn bucket_ranges(sizes: &[usize], cap: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && filled + n > cap {
            out.push(start..i);
            (start, filled) = (i, 0);
        }
        filled += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Replaces the gradient in `grads` of each parameter of `params` (id and shape, in the same
/// order on every rank) by its sum over `group`'s ranks. A parameter this rank has no gradient
/// for counts as zeros, so every rank sums the same layout.
pub fn all_reduce_grads<B: Backend>(
    params: &[(ParamId, Vec<usize>)],
    grads: &mut GradientsParams,
    group: &dyn Collective,
    device: &B::Device,
) -> Result<(), DistError> {
    let sizes: Vec<usize> = params
        .iter()
        .map(|(_, shape)| shape.iter().product())
        .collect();
    for range in bucket_ranges(&sizes, DEFAULT_BUCKET_VALUES) {
        let total: usize = sizes[range.clone()].iter().sum();
        let mut flat = Vec::with_capacity(total);
        for (id, shape) in &params[range.clone()] {
            match take_flat::<B>(grads, *id, shape) {
                Some(g) => flat.extend(crate::backend::host_f32(g)),
                None => flat.resize(flat.len() + shape.iter().product::<usize>(), 0.0),
            }
        }
        group.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for (id, shape) in &params[range] {
            let n: usize = shape.iter().product();
            let values = TensorData::new(flat[at..at + n].to_vec(), [n]);
            put_shaped::<B>(grads, *id, Tensor::from_data(values, device), shape);
            at += n;
        }
    }
    Ok(())
}

/// The gradient of `id` (shape `shape`) taken out of `grads`, flattened.
fn take_flat<B: Backend>(
    grads: &mut GradientsParams,
    id: ParamId,
    shape: &[usize],
) -> Option<Tensor<B, 1>> {
    let n = shape.iter().product::<usize>();
    match shape.len() {
        1 => grads.remove::<B, 1>(id),
        2 => grads.remove::<B, 2>(id).map(|g| g.reshape([n])),
        3 => grads.remove::<B, 3>(id).map(|g| g.reshape([n])),
        4 => grads.remove::<B, 4>(id).map(|g| g.reshape([n])),
        d => panic!("a trainable parameter of rank {d}"),
    }
}

/// Registers `flat` as the gradient of `id`, in `shape`.
fn put_shaped<B: Backend>(
    grads: &mut GradientsParams,
    id: ParamId,
    flat: Tensor<B, 1>,
    shape: &[usize],
) {
    match *shape {
        [_] => grads.register::<B, 1>(id, flat),
        [a, b] => grads.register::<B, 2>(id, flat.reshape([a, b])),
        [a, b, c] => grads.register::<B, 3>(id, flat.reshape([a, b, c])),
        [a, b, c, d] => grads.register::<B, 4>(id, flat.reshape([a, b, c, d])),
        _ => panic!("a trainable parameter of rank {}", shape.len()),
    }
}
