//! AdamW updates of many flattened parameters, and the sum of squares of many gradients (for
//! global-norm clipping), each as a few kernel launches for all tensors on burn-cuda (torch's
//! multi-tensor scheme); burn's operations elsewhere. A LoRA step at Qwen2.5-0.5B updates 336
//! small tensors: one launch or more each left the GPU waiting between them.
//!
//! The arithmetic is torch's `_single_tensor_adamw` in f32 (see `crate::train::optim`):
//! `g = grad * scale`, `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `w = w (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.

use burn::tensor::{
    backend::Backend, ops::FloatTensor, FloatDType, Shape, Tensor, TensorMetadata, TensorPrimitive,
};

/// The scalars of one update; `weight_decay` already chosen for this parameter (0 for biases
/// and norms), `step` the update's number from 1 (for the bias corrections).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

impl AdamwStep {
    /// `1 - beta1^step`.
    pub fn bias_correction1(&self) -> f64 {
        1.0 - self.beta1.powi(self.step as i32)
    }

    /// `1 - beta2^step`.
    pub fn bias_correction2(&self) -> f64 {
        1.0 - self.beta2.powi(self.step as i32)
    }
}

/// The updated weights (in the update's precision), moments, and the weights rounded to the
/// parameter's own type when that differs (`low`).
pub struct AdamwOutput<B: Backend> {
    pub weights: Tensor<B, 1>,
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
    pub low: Option<Tensor<B, 1>>,
}

/// The update from burn's operations (what backends without a fused kernel run, and the
/// reference the kernel is checked against). `grad` is cast to the weights' type first.
pub fn composed<B: Backend>(
    weights: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    grad_scale: Option<Tensor<B, 1>>,
    hp: AdamwStep,
    low: Option<FloatDType>,
) -> AdamwOutput<B> {
    let grad = if grad.dtype() == weights.dtype() {
        grad
    } else {
        grad.cast(FloatDType::from(weights.dtype()))
    };
    let g = match grad_scale {
        Some(scale) => grad.mul(scale),
        None => grad,
    };
    let m = exp_avg
        .mul_scalar(hp.beta1)
        .add(g.clone().mul_scalar(1.0 - hp.beta1));
    let v = exp_avg_sq
        .mul_scalar(hp.beta2)
        .add(g.powi_scalar(2).mul_scalar(1.0 - hp.beta2));
    let w = if hp.weight_decay == 0.0 {
        weights
    } else {
        weights.mul_scalar(1.0 - hp.lr * hp.weight_decay)
    };
    let denom = v
        .clone()
        .sqrt()
        .div_scalar(hp.bias_correction2().sqrt())
        .add_scalar(hp.eps);
    let w = w.sub(
        m.clone()
            .div(denom)
            .mul_scalar(hp.lr / hp.bias_correction1()),
    );
    AdamwOutput {
        low: low.map(|dtype| w.clone().cast(dtype)),
        weights: w,
        exp_avg: m,
        exp_avg_sq: v,
    }
}

/// One parameter's part of a group update: flat weights and moments in the update's precision,
/// the flat gradient in the parameter's type, its scalars, and `low`, the type to round the new
/// weights to when the parameter is held in another type than the update's.
pub struct AdamwTensors<T> {
    pub weights: T,
    pub grad: T,
    pub exp_avg: T,
    pub exp_avg_sq: T,
    pub hp: AdamwStep,
    pub low: Option<FloatDType>,
}

/// What one parameter's update produced (see [`AdamwOutput`]).
pub struct AdamwUpdated<T> {
    pub weights: T,
    pub exp_avg: T,
    pub exp_avg_sq: T,
    pub low: Option<T>,
}

fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `t` as a flat tensor (a reshape: free for contiguous memory).
fn flat<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    let n = t.shape().num_elements();
    float::<B>(B::float_reshape(t, Shape::new([n])))
}

/// `t` in `shape`.
fn shaped<B: Backend>(t: Tensor<B, 1>, shape: &Shape) -> FloatTensor<B> {
    B::float_reshape(t.into_primitive().tensor(), shape.clone())
}

/// [`composed`] for each parameter, on primitives of any shape (the default of
/// [`crate::backend::FastOps::fast_adamw_many`]): results in each one's weights' shape.
pub(crate) fn composed_many<B: Backend>(
    params: Vec<AdamwTensors<FloatTensor<B>>>,
    grad_scale: Option<FloatTensor<B>>,
) -> Vec<AdamwUpdated<FloatTensor<B>>> {
    let scale = grad_scale.map(flat::<B>);
    params
        .into_iter()
        .map(|p| {
            let shape = p.weights.shape();
            let out = composed(
                flat::<B>(p.weights),
                flat::<B>(p.grad),
                flat::<B>(p.exp_avg),
                flat::<B>(p.exp_avg_sq),
                scale.clone(),
                p.hp,
                p.low,
            );
            AdamwUpdated {
                weights: shaped(out.weights, &shape),
                exp_avg: shaped(out.exp_avg, &shape),
                exp_avg_sq: shaped(out.exp_avg_sq, &shape),
                low: out.low.map(|l| shaped(l, &shape)),
            }
        })
        .collect()
}

/// The sum of the squares of every element of `tensors` (any shapes), in f32, as a `[1]`
/// tensor (zero for none): burn's operations, one reduction per tensor (the default of
/// [`crate::backend::FastOps::fast_sum_squares`]).
pub(crate) fn composed_sum_squares<B: Backend>(
    tensors: Vec<FloatTensor<B>>,
    device: &B::Device,
) -> FloatTensor<B> {
    let sum = tensors
        .into_iter()
        .map(|t| flat::<B>(t).cast(FloatDType::F32).powi_scalar(2).sum())
        .reduce(|acc, s| acc.add(s))
        .unwrap_or_else(|| Tensor::zeros([1], (device, burn::tensor::DType::F32)));
    sum.into_primitive().tensor()
}
