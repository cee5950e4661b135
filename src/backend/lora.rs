//! The LoRA projection `y = x W^T + scale (x A^T) B^T` as one operation, forward and backward.
//!
//! Composed from burn's operations it is five autodiff nodes (three products, a scale, a sum),
//! each with its own host work and, in the backward pass, full-size elementwise passes (the scale
//! of `dy`, the sum of the two gradients of `x`). As one node its backward pass is five GEMMs;
//! on burn-cuda the scale and the sums ride in cuBLAS's `alpha` and `beta`, so no elementwise
//! kernel runs at all. Reference: Hu et al. 2021; peft `tuners/lora/layer.py` `Linear.forward`.

use burn::tensor::{backend::Backend, ops::FloatTensor, Tensor, TensorPrimitive};

use crate::backend::FastOps;

/// Which inputs of the projection need a gradient: `x`, `W`, `A`, `B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraGrads {
    pub x: bool,
    pub weight: bool,
    pub a: bool,
    pub b: bool,
}

/// The gradients asked for by [`LoraGrads`], in the inputs' shapes.
pub struct LoraGradients<B: Backend> {
    pub x: Option<FloatTensor<B>>,
    pub weight: Option<FloatTensor<B>>,
    pub a: Option<FloatTensor<B>>,
    pub b: Option<FloatTensor<B>>,
}

fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend>(t: Tensor<B, 2>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The forward pass from [`FastOps::fast_gemm_2d`] and burn's operations.
pub(crate) fn composed_forward<B: FastOps>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let y = float::<B>(B::fast_gemm_2d(x.clone(), weight, false, true));
    let low = B::fast_gemm_2d(B::fast_gemm_2d(x, a, false, true), b, false, true);
    prim(y.add(float::<B>(low).mul_scalar(scale)))
}

/// The backward pass from [`FastOps::fast_gemm_2d`] and burn's operations. With `t = dy B`:
/// `dx = dy W + scale t A`, `dW = dy^T x`, `dA = scale t^T x`, `dB = scale dy^T (x A^T)`.
pub(crate) fn composed_backward<B: FastOps>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f64,
    dy: FloatTensor<B>,
    wanted: LoraGrads,
) -> LoraGradients<B> {
    let t = (wanted.x || wanted.a).then(|| B::fast_gemm_2d(dy.clone(), b, false, false));
    let dx = wanted.x.then(|| {
        let base = float::<B>(B::fast_gemm_2d(dy.clone(), weight, false, false));
        let low = float::<B>(B::fast_gemm_2d(
            t.clone().expect("t"),
            a.clone(),
            false,
            false,
        ));
        prim(base.add(low.mul_scalar(scale)))
    });
    let da = wanted.a.then(|| {
        let g = B::fast_gemm_2d(t.expect("t"), x.clone(), true, false);
        prim(float::<B>(g).mul_scalar(scale))
    });
    let db = wanted.b.then(|| {
        let u = B::fast_gemm_2d(x.clone(), a, false, true);
        prim(float::<B>(B::fast_gemm_2d(dy.clone(), u, true, false)).mul_scalar(scale))
    });
    let dw = wanted.weight.then(|| B::fast_gemm_2d(dy, x, true, false));
    LoraGradients {
        x: dx,
        weight: dw,
        a: da,
        b: db,
    }
}
