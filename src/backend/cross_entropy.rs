//! Cross-entropy through the LM head in chunks of tokens: per chunk, logits = h W^T (one GEMM),
//! log-sum-exp and the target logit in f32; only the per-token log-sum-exp survives the forward
//! pass. The backward pass recomputes each chunk's logits and forms
//! `dlogits = (softmax - onehot) * mask * g / count`, then `dh = dlogits W`, `dW += dlogits^T h`.
//!
//! Reference: Liger-Kernel `fused_linear_cross_entropy` (chunked recompute), PyTorch
//! `F.cross_entropy(reduction="mean", ignore_index=-100)` for the semantics.

// burn's `slice` takes one range per dimension: a one-element array is a 1-D slice.
#![allow(clippy::single_range_in_vec_init)]

use burn::tensor::{backend::Backend, DType, FloatDType, IndexingUpdateOp, Int, Tensor};

use crate::backend::{linear, matmul_2d, matmul_tn};

/// Label value skipped by the loss (PyTorch's default `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// What the forward pass keeps for the backward one.
pub struct Forward<B: Backend> {
    /// Mean loss over non-ignored tokens, f32, shape `[1]`.
    pub loss: Tensor<B, 1>,
    /// Per-token log-sum-exp of the logits, f32, `[n]`.
    pub lse: Tensor<B, 1>,
    /// Number of non-ignored tokens (at least 1), f32, `[1]`.
    pub count: Tensor<B, 1>,
}

fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk)).map(move |i| (i * chunk, ((i + 1) * chunk).min(n)))
}

/// Valid-token mask (f32 `[n]`) and labels with ignored entries replaced by 0.
fn mask_and_targets<B: Backend>(labels: Tensor<B, 1, Int>) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    let ignored = labels.clone().equal_elem(IGNORE_INDEX);
    let mask = ignored.clone().bool_not().float().cast(FloatDType::F32);
    (mask, labels.mask_fill(ignored, 0))
}

/// f32 logits of one chunk: `h [c, d] @ weight^T` through a transposed view of the weight.
fn chunk_logits<B: Backend>(h: Tensor<B, 2>, weight: &Tensor<B, 2>) -> Tensor<B, 2> {
    linear(h, weight.clone()).cast(FloatDType::F32)
}

/// Forward pass on any backend (differentiable by burn's autodiff too, but then the logits of
/// every chunk are kept; `Autodiff` uses [`backward`] instead).
pub fn forward<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    chunk: usize,
) -> Forward<B> {
    let n = hidden.dims()[0];
    let (mask, targets) = mask_and_targets(labels);
    let mut lses = Vec::new();
    let mut losses = Vec::new();
    for (start, end) in chunks(n, chunk) {
        let logits = chunk_logits(hidden.clone().slice([start..end]), &weight);
        let max = logits.clone().max_dim(1).detach();
        let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let target = logits.gather(1, targets.clone().slice([start..end]).unsqueeze_dim(1));
        let lse = lse.squeeze_dim::<1>(1);
        losses.push((lse.clone() - target.squeeze_dim::<1>(1)) * mask.clone().slice([start..end]));
        lses.push(lse);
    }
    let count = mask.sum().clamp_min(1.0);
    let loss = Tensor::cat(losses, 0).sum() / count.clone();
    Forward {
        loss,
        lse: Tensor::cat(lses, 0),
        count,
    }
}

/// Gradients of the mean loss for `hidden` and (when `want_weight`) `weight`, given the
/// upstream gradient `grad [1]` and the forward pass's `lse` and `count`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    lse: Tensor<B, 1>,
    count: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    chunk: usize,
    want_weight: bool,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let [n, d] = hidden.dims();
    let vocab = weight.dims()[0];
    let dtype: DType = hidden.dtype();
    let device = hidden.device();
    let (mask, targets) = mask_and_targets(labels);
    let scale = grad.cast(FloatDType::F32) / count;
    let mut grad_hidden = Vec::new();
    let mut grad_weight: Option<Tensor<B, 2>> = None;
    for (start, end) in chunks(n, chunk) {
        let rows = end - start;
        let h = hidden.clone().slice([start..end]);
        let logits = chunk_logits(h.clone(), &weight);
        let lse_c = lse.clone().slice([start..end]).unsqueeze_dim::<2>(1);
        let minus_one = Tensor::<B, 2>::full([rows, 1], -1.0, (&device, DType::F32));
        let probs = (logits - lse_c).exp().scatter(
            1,
            targets.clone().slice([start..end]).unsqueeze_dim(1),
            minus_one,
            IndexingUpdateOp::Add,
        );
        let row_scale = (mask.clone().slice([start..end]) * scale.clone()).unsqueeze_dim::<2>(1);
        let dlogits = (probs * row_scale).cast(dtype);
        grad_hidden.push(matmul_2d(dlogits.clone(), weight.clone()));
        if want_weight {
            let part = matmul_tn(dlogits, h).cast(FloatDType::F32);
            grad_weight = Some(match grad_weight {
                Some(acc) => acc + part,
                None => part,
            });
        }
    }
    let grad_hidden = if grad_hidden.is_empty() {
        Tensor::zeros([n, d], (&device, dtype))
    } else {
        Tensor::cat(grad_hidden, 0)
    };
    let grad_weight = want_weight.then(|| {
        grad_weight
            .map(|g| g.cast(dtype))
            .unwrap_or_else(|| Tensor::zeros([vocab, d], (&device, dtype)))
    });
    (grad_hidden, grad_weight)
}

/// The mean loss in one piece through burn's own differentiable ops (for backends without
/// [`crate::backend::FastOps`]).
pub fn reference<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let n = hidden.dims()[0];
    forward::<B>(hidden, weight, labels, n.max(1)).loss
}
