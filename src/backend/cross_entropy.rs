//! Cross-entropy through the LM head in chunks of tokens: per chunk, logits = h W^T (one GEMM,
//! in the model's type), then one pass over them gives each row's loss (log-sum-exp minus the
//! target logit, in f32) and, when gradients are wanted, overwrites them with
//! `dlogits = (softmax - onehot) * mask / count`, from which `dh = dlogits W` and
//! `dW += dlogits^T h` follow at once. The backward pass only scales those by the upstream
//! gradient (the loss is linear in it), so the logits are never recomputed and no chunk's
//! logits outlive it.
//!
//! Reference: Liger-Kernel `fused_linear_cross_entropy` (gradient in the forward pass), PyTorch
//! `F.cross_entropy(reduction="mean", ignore_index=-100)` for the semantics.

// burn's `slice` takes one range per dimension: a one-element array is a 1-D slice.
#![allow(clippy::single_range_in_vec_init)]

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{
    backend::Backend, DType, FloatDType, IndexingUpdateOp, Int, Tensor, TensorPrimitive,
};

use crate::backend::{linear, matmul_2d, matmul_tn};

/// Label value skipped by the loss (PyTorch's default `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The loss, and the gradients of the loss for an upstream gradient of 1 that were asked for.
pub struct Forward<B: Backend> {
    /// Mean loss over non-ignored tokens, f32, shape `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[n, d]` in the hidden states' type.
    pub grad_hidden: Option<Tensor<B, 2>>,
    /// `[vocab, d]` in the weight's type.
    pub grad_weight: Option<Tensor<B, 2>>,
}

fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk)).map(move |i| (i * chunk, ((i + 1) * chunk).min(n)))
}

/// Per-row losses of `logits [rows, vocab]` against `labels [rows]` ([`IGNORE_INDEX`] or any
/// negative label: ignored, loss 0) and, with `want_grad`, the gradient of
/// `sum(losses) * inv_count` for the logits, in their type: burn's operations (the default of
/// [`crate::backend::FastOps::fast_cross_entropy_rows`]).
pub fn rows_reference<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    inv_count: Tensor<B, 1>,
    want_grad: bool,
) -> (Tensor<B, 1>, Option<Tensor<B, 2>>) {
    let [rows, _] = logits.dims();
    let dtype: DType = logits.dtype();
    let ignored = labels.clone().lower_elem(0);
    let mask = ignored.clone().bool_not().float().cast(FloatDType::F32);
    let targets = labels.mask_fill(ignored, 0).unsqueeze_dim::<2>(1);
    let x = logits.cast(FloatDType::F32);
    let max = x.clone().max_dim(1).detach();
    let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let target = x.clone().gather(1, targets.clone());
    let loss = (lse.clone() - target).squeeze_dim::<1>(1) * mask.clone();
    let grad = want_grad.then(|| {
        let device = x.device();
        let minus_one = Tensor::<B, 2>::full([rows, 1], -1.0, (&device, DType::F32));
        let probs = (x - lse)
            .exp()
            .scatter(1, targets, minus_one, IndexingUpdateOp::Add);
        let row_scale = (mask * inv_count.cast(FloatDType::F32)).unsqueeze_dim::<2>(1);
        (probs * row_scale).cast(dtype)
    });
    (loss, grad)
}

/// [`rows_reference`] on primitives (the default of
/// [`crate::backend::FastOps::fast_cross_entropy_rows`] and the CUDA fallback).
pub(crate) fn rows_reference_primitive<B: Backend>(
    logits: FloatTensor<B>,
    labels: IntTensor<B>,
    inv_count: FloatTensor<B>,
    want_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let (loss, grad) = rows_reference::<B>(
        Tensor::from_primitive(TensorPrimitive::Float(logits)),
        Tensor::from_primitive(labels),
        Tensor::from_primitive(TensorPrimitive::Float(inv_count)),
        want_grad,
    );
    (
        loss.into_primitive().tensor(),
        grad.map(|g| g.into_primitive().tensor()),
    )
}

/// The LM head's gradients for its input rows and its weight, gathered chunk by chunk from each
/// chunk's logit gradient (the chunked loss here and the chunked log-probs of
/// [`crate::backend::token_logps`]): `dh = dlogits W` per chunk, `dW` summed in f32.
pub(crate) struct HeadGrads<B: Backend> {
    want_hidden: bool,
    want_weight: bool,
    hidden: Vec<Tensor<B, 2>>,
    weight: Option<Tensor<B, 2>>,
}

impl<B: Backend> HeadGrads<B> {
    pub(crate) fn new(want_hidden: bool, want_weight: bool) -> Self {
        Self {
            want_hidden,
            want_weight,
            hidden: Vec::new(),
            weight: None,
        }
    }

    /// Adds the chunk of input rows `h` whose logits have the gradient `dlogits`.
    pub(crate) fn add(&mut self, dlogits: Tensor<B, 2>, h: Tensor<B, 2>, weight: &Tensor<B, 2>) {
        if self.want_hidden {
            self.hidden.push(matmul_2d(dlogits.clone(), weight.clone()));
        }
        if self.want_weight {
            let part = matmul_tn(dlogits, h).cast(FloatDType::F32);
            self.weight = Some(match self.weight.take() {
                Some(acc) => acc + part,
                None => part,
            });
        }
    }

    /// The gradients asked for, shaped and typed as `hidden` and `weight` (zeros where no chunk
    /// added any).
    pub(crate) fn finish(
        self,
        hidden: &Tensor<B, 2>,
        weight: &Tensor<B, 2>,
    ) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 2>>) {
        let dtype: DType = hidden.dtype();
        let device = hidden.device();
        let grad_hidden = self.want_hidden.then(|| {
            if self.hidden.is_empty() {
                Tensor::zeros(hidden.dims(), (&device, dtype))
            } else {
                Tensor::cat(self.hidden, 0)
            }
        });
        let grad_weight = self.want_weight.then(|| {
            self.weight
                .map(|g| g.cast(dtype))
                .unwrap_or_else(|| Tensor::zeros(weight.dims(), (&device, dtype)))
        });
        (grad_hidden, grad_weight)
    }
}

/// The mean loss of `hidden [n, d] @ weight^T` against `labels [n]`, `chunk` rows at a time,
/// with the gradients for an upstream gradient of 1 where `want_hidden` / `want_weight` ask.
pub fn forward<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    chunk: usize,
    want_hidden: bool,
    want_weight: bool,
) -> Forward<B> {
    let n = hidden.dims()[0];
    let device = hidden.device();
    let count = labels
        .clone()
        .greater_equal_elem(0)
        .float()
        .cast(FloatDType::F32)
        .sum()
        .clamp_min(1.0);
    let inv_count = count.recip();
    let want_grad = want_hidden || want_weight;
    let mut losses = Vec::new();
    let mut grads = HeadGrads::new(want_hidden, want_weight);
    for (start, end) in chunks(n, chunk) {
        let h = hidden.clone().slice([start..end]);
        let logits = linear(h.clone(), weight.clone());
        let (loss, dlogits) = crate::backend::cross_entropy_rows(
            logits,
            labels.clone().slice([start..end]),
            inv_count.clone(),
            want_grad,
        );
        losses.push(loss);
        if let Some(dlogits) = dlogits {
            grads.add(dlogits, h, &weight);
        }
    }
    let loss = if losses.is_empty() {
        Tensor::zeros([1], (&device, DType::F32))
    } else {
        Tensor::cat(losses, 0).sum() * inv_count
    };
    let (grad_hidden, grad_weight) = grads.finish(&hidden, &weight);
    Forward {
        loss,
        grad_hidden,
        grad_weight,
    }
}

/// `grad` (from the forward pass, for an upstream gradient of 1) times the upstream gradient
/// `upstream [1]`, in f32 then back to `grad`'s type.
pub fn scale_by_upstream<B: Backend>(grad: Tensor<B, 2>, upstream: Tensor<B, 1>) -> Tensor<B, 2> {
    let dtype: DType = grad.dtype();
    (grad.cast(FloatDType::F32) * upstream.cast(FloatDType::F32).unsqueeze_dim::<2>(1)).cast(dtype)
}

/// The mean loss in one piece through burn's own differentiable ops (for backends without
/// [`crate::backend::FastOps`]).
pub fn reference<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let n = hidden.dims()[0];
    forward::<B>(hidden, weight, labels, n.max(1), false, false).loss
}
