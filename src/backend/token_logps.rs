//! Per-token log-probabilities through the LM head in chunks of tokens: `logp[i] = z[i, t_i] -
//! logsumexp(z[i])` with `z = (h W^T) / temperature`, as GRPO's loss and its reference and old
//! policies need them (TRL `_get_per_token_logps`). Only each row's log-sum-exp is kept; the
//! backward pass recomputes a chunk's logits and turns them into `dz = g (onehot - softmax)`,
//! so the `[tokens, vocab]` logits (470 MB in f32 for 12 x 200 tokens of SmolLM2, 1.5 GB for
//! Qwen2.5's vocabulary) and the copies softmax makes of them never exist at once.
//!
//! Unlike the mean cross-entropy ([`crate::backend::cross_entropy`]) the upstream gradient is a
//! vector (one weight per token: advantage, KL term, mask), unknown in the forward pass, so the
//! gradient cannot be formed there.

// burn's `slice` takes one range per dimension: a one-element array is a 1-D slice.
#![allow(clippy::single_range_in_vec_init)]

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{
    backend::Backend, DType, FloatDType, IndexingUpdateOp, Int, Tensor, TensorPrimitive,
};

use crate::backend::cross_entropy::HeadGrads;
use crate::backend::linear;

/// `[start, end)` row ranges of at most `chunk` rows.
fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk)).map(move |i| (i * chunk, ((i + 1) * chunk).min(n)))
}

/// The targets as gather indices (negative: row ignored, index 0) and the f32 mask of kept rows.
fn split_targets<B: Backend>(targets: Tensor<B, 1, Int>) -> (Tensor<B, 2, Int>, Tensor<B, 1>) {
    let ignored = targets.clone().lower_elem(0);
    let keep = ignored.clone().bool_not().float().cast(FloatDType::F32);
    (targets.mask_fill(ignored, 0).unsqueeze_dim::<2>(1), keep)
}

/// Log-probabilities (f32, `[n]`, 0 where the target is negative) of `targets [n]` under
/// `softmax(hidden [n, d] @ weight [v, d]^T / temperature)`, and each row's log-sum-exp of the
/// scaled logits (f32, `[n]`), `chunk` rows at a time.
pub fn forward<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f64,
    chunk: usize,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let n = hidden.dims()[0];
    let device = hidden.device();
    if n == 0 {
        let empty = || Tensor::zeros([0], (&device, DType::F32));
        return (empty(), empty());
    }
    let (mut logps, mut lses) = (Vec::new(), Vec::new());
    for (start, end) in chunks(n, chunk) {
        let z = scaled_logits(
            hidden.clone().slice([start..end]),
            weight.clone(),
            temperature,
        );
        let max = z.clone().max_dim(1);
        let lse = (z.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let (index, keep) = split_targets(targets.clone().slice([start..end]));
        let logp = (z.gather(1, index) - lse.clone()).squeeze_dim::<1>(1) * keep;
        logps.push(logp);
        lses.push(lse.squeeze_dim::<1>(1));
    }
    (Tensor::cat(logps, 0), Tensor::cat(lses, 0))
}

/// `(h W^T) / temperature` in f32.
fn scaled_logits<B: Backend>(
    h: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 2> {
    let z = linear(h, weight).cast(FloatDType::F32);
    if temperature == 1.0 {
        z
    } else {
        z.div_scalar(temperature)
    }
}

/// The gradients of `sum(upstream * logp)` for the hidden states and the weight (each only when
/// asked for), recomputing each chunk's logits: `dz = upstream (onehot - softmax(z))`,
/// `dlogits = dz / temperature`, `dh = dlogits W`, `dW = dlogits^T h`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    lse: Tensor<B, 1>,
    upstream: Tensor<B, 1>,
    temperature: f64,
    chunk: usize,
    want: (bool, bool),
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 2>>) {
    let (want_hidden, want_weight) = want;
    let n = hidden.dims()[0];
    let dtype: DType = hidden.dtype();
    let upstream = upstream.cast(FloatDType::F32);
    let mut grads = HeadGrads::new(want_hidden, want_weight);
    for (start, end) in chunks(n, chunk) {
        let h = hidden.clone().slice([start..end]);
        let z = scaled_logits(h.clone(), weight.clone(), temperature);
        let (index, keep) = split_targets(targets.clone().slice([start..end]));
        let g = (upstream.clone().slice([start..end]) * keep).unsqueeze_dim::<2>(1);
        let probs = (z - lse.clone().slice([start..end]).unsqueeze_dim::<2>(1)).exp();
        let dz = (probs * g.clone().neg()).scatter(1, index, g, IndexingUpdateOp::Add);
        let dlogits = if temperature == 1.0 {
            dz
        } else {
            dz.div_scalar(temperature)
        }
        .cast(dtype);
        grads.add(dlogits, h, &weight);
    }
    grads.finish(&hidden, &weight)
}

/// The same log-probabilities through burn's own differentiable ops on the full logits (for
/// backends without [`crate::backend::FastOps`], and the tests' reference).
pub fn reference<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f64,
) -> Tensor<B, 1> {
    let z = scaled_logits(hidden, weight, temperature);
    let logp = burn::tensor::activation::log_softmax(z, 1);
    let (index, keep) = split_targets(targets);
    logp.gather(1, index).squeeze_dim::<1>(1) * keep
}

/// [`forward`] on primitives (the default of [`crate::backend::FastOps::fast_token_logps_forward`]
/// and the CPU's fallback for non-f32 tensors).
pub(crate) fn forward_primitive<B: Backend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    temperature: f64,
    chunk: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (logps, lse) = forward::<B>(
        Tensor::from_primitive(TensorPrimitive::Float(hidden)),
        Tensor::from_primitive(TensorPrimitive::Float(weight)),
        Tensor::from_primitive(targets),
        temperature,
        chunk,
    );
    (
        logps.into_primitive().tensor(),
        lse.into_primitive().tensor(),
    )
}

/// [`backward`] on primitives (as [`forward_primitive`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_primitive<B: Backend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    upstream: FloatTensor<B>,
    temperature: f64,
    chunk: usize,
    want: (bool, bool),
) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
    let float = |t: FloatTensor<B>| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
    let (dh, dw) = backward::<B>(
        float(hidden),
        float(weight),
        Tensor::from_primitive(targets),
        Tensor::from_primitive(TensorPrimitive::Float(lse)),
        Tensor::from_primitive(TensorPrimitive::Float(upstream)),
        temperature,
        chunk,
        want,
    );
    (
        dh.map(|g| g.into_primitive().tensor()),
        dw.map(|g| g.into_primitive().tensor()),
    )
}
