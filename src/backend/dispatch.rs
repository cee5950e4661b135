//! The generic entry points of the fast kernels. Model code is generic over plain `Backend`;
//! these functions recognise, by `TypeId`, the concrete backends runner instantiates (ndarray
//! and burn-cuda in f32 and bf16, each bare and under `Autodiff`; activation checkpointing is the
//! model's own, see [`crate::backend::checkpoint`])
//! and route them to their [`FastOps`] implementation. Any other backend gets burn's own ops,
//! with the same results.

use std::any::{Any, TypeId};

use burn::tensor::{backend::Backend, ops::FloatTensor, Bool, DType, Int, Tensor, TensorPrimitive};

use crate::backend::adamw::{AdamwTensors, AdamwUpdated};
use crate::backend::checkpoint::LayerReplay;
use crate::backend::{attention, cross_entropy, token_logps, FastOps, FusedAttentionSpec};

fn same<A: 'static, B: 'static>() -> bool {
    TypeId::of::<A>() == TypeId::of::<B>()
}

/// Moves `x` into type `U`; only called once [`same`] has said the two types are one.
fn recast<T: 'static, U: 'static>(x: T) -> U {
    let mut slot = Some(x);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take)
        .expect("recast between identical types")
}

/// Returns `$call::<T>(args)` from the enclosing function when `$B` is `T`.
macro_rules! route_to {
    ($B:ty, $T:ty, $call:ident, ($($arg:ident),*)) => {
        if same::<$B, $T>() {
            return recast($call::<$T>($(recast($arg)),*));
        }
    };
}

/// Routes `$call` to the first backend runner instantiates that `$B` is.
macro_rules! route {
    ($B:ty, $call:ident, ($($arg:ident),*)) => {{
        type Cpu = burn::backend::NdArray<f32>;
        route_to!($B, Cpu, $call, ($($arg),*));
        route_to!($B, burn::backend::Autodiff<Cpu>, $call, ($($arg),*));
        #[cfg(feature = "cuda")]
        {
            type Cuda32 = burn::backend::Cuda<f32, i32>;
            type Cuda16 = burn::backend::Cuda<half::bf16, i32>;
            route_to!($B, Cuda32, $call, ($($arg),*));
            route_to!($B, burn::backend::Autodiff<Cuda32>, $call, ($($arg),*));
            route_to!($B, Cuda16, $call, ($($arg),*));
            route_to!($B, burn::backend::Autodiff<Cuda16>, $call, ($($arg),*));
        }
    }};
}

fn fast_matmul<F: FastOps>(a: Tensor<F, 3>, b: Tensor<F, 3>) -> Tensor<F, 3> {
    let out = F::fast_matmul(a.into_primitive().tensor(), b.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn fast_cross_entropy<F: FastOps>(
    hidden: Tensor<F, 2>,
    weight: Tensor<F, 2>,
    labels: Tensor<F, 1, Int>,
    chunk: usize,
) -> Tensor<F, 1> {
    let out = F::fast_linear_cross_entropy(
        hidden.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        labels.into_primitive(),
        chunk,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Batched matrix product `a [b, m, k] @ b [b, k, n] -> [b, m, n]` (a batch of 1 broadcasts).
/// On burn-cuda large products run on cuBLAS (bf16/f16/f32, f32 accumulation), reading
/// transposed or sliced views without copying them; elsewhere burn's matmul. Differentiable.
pub fn matmul<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> Tensor<B, 3> {
    route!(B, fast_matmul, (a, b));
    a.matmul(b)
}

fn fast_narrow<F: FastOps>(x: Tensor<F, 3>, len: usize) -> Tensor<F, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(F::fast_narrow(
        x.into_primitive().tensor(),
        len,
    )))
}

/// The first `len` positions of axis 1 of `x [rows, positions, d]`; a view on the CPU too.
pub fn narrow<B: Backend>(x: Tensor<B, 3>, len: usize) -> Tensor<B, 3> {
    route!(B, fast_narrow, (x, len));
    x.narrow(1, 0, len)
}

fn fast_masked_softmax<F: FastOps>(
    scores: Tensor<F, 4>,
    mask: Option<Tensor<F, 4, Bool>>,
    scale: f64,
    masked_value: f64,
) -> Tensor<F, 4> {
    let out = F::fast_masked_softmax(
        scores.into_primitive().tensor(),
        mask.map(Tensor::into_primitive),
        scale,
        masked_value,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Attention probabilities: `softmax(scores * scale)` over the last axis, `masked_value` taking
/// the place of the scaled score where `mask` (the shape of `scores`) is true. Under `Autodiff`
/// one node that keeps only its output (see [`FastOps::fast_masked_softmax`]).
pub fn masked_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    masked_value: f64,
) -> Tensor<B, 4> {
    route!(B, fast_masked_softmax, (scores, mask, scale, masked_value));
    composed_masked_softmax(scores, mask, scale, masked_value)
}

/// [`masked_softmax`] from burn's ops (what backends without their own version run).
pub(crate) fn composed_masked_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    masked_value: f64,
) -> Tensor<B, 4> {
    let scaled = scores.mul_scalar(scale);
    let masked = match mask {
        Some(m) => scaled.mask_fill(m, masked_value),
        None => scaled,
    };
    burn::tensor::activation::softmax(masked, 3)
}

fn fast_swiglu<F: FastOps>(gate: Tensor<F, 2>, up: Tensor<F, 2>) -> Tensor<F, 2> {
    let out = F::fast_swiglu(gate.into_primitive().tensor(), up.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `silu(gate) * up` on `[rows, intermediate]`; under `Autodiff` one node that keeps only its
/// two inputs (see [`FastOps::fast_swiglu`]).
pub fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    route!(B, fast_swiglu, (gate, up));
    composed_swiglu(gate, up)
}

/// SwiGLU from burn's ops.
pub(crate) fn composed_swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    burn::tensor::activation::silu(gate).mul(up)
}

fn fast_rms_norm<F: FastOps>(x: Tensor<F, 2>, weight: Tensor<F, 1>, eps: f64) -> Tensor<F, 2> {
    let out = F::fast_rms_norm(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        eps,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// RMSNorm over the last axis of `x [rows, hidden]` with `weight [hidden]`; under `Autodiff`
/// one node that keeps `x` and the inverse RMS of each row (see [`FastOps::fast_rms_norm`]).
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    route!(B, fast_rms_norm, (x, weight, eps));
    composed_rms_norm(x, weight, eps).0
}

/// RMSNorm from burn's ops: the output and the inverse RMS `[rows, 1]`.
pub(crate) fn composed_rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let inv_rms = x
        .clone()
        .powi_scalar(2)
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    let y = x.mul(inv_rms.clone()).mul(weight.unsqueeze::<2>());
    (y, inv_rms)
}

/// RMSNorm's gradients from burn's ops (see [`crate::backend::FastOps::fast_rms_norm_backward`]):
/// with `xh = x r` (`r` the inverse RMS) and `y = xh w`: `dw = sum_rows(dy xh)`,
/// `dx = r (dy w - xh mean(dy w xh))`.
pub(crate) fn composed_rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    inv_rms: FloatTensor<B>,
    dy: FloatTensor<B>,
    (want_x, want_w): (bool, bool),
) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    let w = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(weight));
    let dy = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(dy));
    // The inverse RMS may be kept in f32 (the CUDA kernel) while x is in bf16.
    let r = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(inv_rms))
        .cast(burn::tensor::FloatDType::from(x.dtype()));
    let xh = x.mul(r.clone());
    let dw = want_w.then(|| {
        let dw = dy.clone().mul(xh.clone()).sum_dim(0);
        let hidden = dw.dims()[1];
        dw.reshape([hidden]).into_primitive().tensor()
    });
    let dx = want_x.then(|| {
        let gw = dy.mul(w.unsqueeze::<2>());
        let mean = gw.clone().mul(xh.clone()).mean_dim(1);
        r.mul(gw.sub(xh.mul(mean))).into_primitive().tensor()
    });
    (dx, dw)
}

/// `x cos + rotate_half(x) sin` (`rotate_half(x) = [-x2, x1]`, transformers'
/// `apply_rotary_pos_emb`) from burn's ops; with `backward`, its gradient for `x` given the
/// output's gradient in `x`: `dx1 = dy1 c1 + dy2 s2`, `dx2 = dy2 c2 - dy1 s1`.
pub(crate) fn composed_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    backward: bool,
) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    if backward {
        let ys = x.clone().mul(sin);
        let y1 = ys.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
        let y2 = ys.slice([0..b, 0..h, 0..t, d / 2..d]);
        return x.mul(cos).add(Tensor::cat(vec![y2, y1.neg()], 3));
    }
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x.mul(cos).add(rotated.mul(sin))
}

/// [`composed_rope`] on primitives (the default of [`FastOps::fast_rope`] and the CUDA
/// fallback).
pub(crate) fn composed_rope_primitive<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    backward: bool,
) -> FloatTensor<B> {
    let float = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
    composed_rope(float(x), float(cos), float(sin), backward)
        .into_primitive()
        .tensor()
}

fn fast_rope<F: FastOps>(x: Tensor<F, 4>, cos: Tensor<F, 4>, sin: Tensor<F, 4>) -> Tensor<F, 4> {
    let prim = |t: Tensor<F, 4>| t.into_primitive().tensor();
    Tensor::from_primitive(TensorPrimitive::Float(F::fast_rope(
        prim(x),
        prim(cos),
        prim(sin),
        false,
    )))
}

/// Rotary position embedding of `x [b, h, t, d]` with `cos`, `sin [1 | b, 1, t, d]` (one
/// kernel and one autodiff node on burn-cuda; cos and sin get no gradient).
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    route!(B, fast_rope, (x, cos, sin));
    composed_rope(x, cos, sin, false)
}

fn fast_fused_attention<F: FastOps>(
    q: Tensor<F, 4>,
    k: Tensor<F, 4>,
    v: Tensor<F, 4>,
    key_valid: Option<Tensor<F, 2, Int>>,
    spec: FusedAttentionSpec,
) -> Tensor<F, 4> {
    let out = F::fast_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        key_valid.map(Tensor::into_primitive),
        spec,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Attention without the score matrix (see [`FastOps::fast_attention`]): `q [b, h, t, d]`,
/// `k`, `v [b, kvh, s, d]`, `key_valid [b, s]` (0 = padding) -> `[b, t, h, d]`. On burn-cuda
/// in bf16 the FlashAttention-2 kernels; elsewhere the same math from burn ops.
pub fn fused_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_valid: Option<Tensor<B, 2, Int>>,
    spec: FusedAttentionSpec,
) -> Tensor<B, 4> {
    route!(B, fast_fused_attention, (q, k, v, key_valid, spec));
    attention::reference_forward(q, k, v, key_valid, spec).0
}

fn fused_supported<F: FastOps>(dtype: DType, head_dim: usize) -> bool {
    F::fused_attention_supported(dtype, head_dim)
}

/// Whether [`fused_attention`] runs a fused kernel on `B` for this element type and head size.
pub fn fused_attention_supported<B: Backend>(dtype: DType, head_dim: usize) -> bool {
    route!(B, fused_supported, (dtype, head_dim));
    false
}

fn fast_gemm_2d<F: FastOps>(
    a: Tensor<F, 2>,
    b: Tensor<F, 2>,
    transpose_a: bool,
    transpose_b: bool,
) -> Tensor<F, 2> {
    let out = F::fast_gemm_2d(
        a.into_primitive().tensor(),
        b.into_primitive().tensor(),
        transpose_a,
        transpose_b,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `op(a) @ op(b)` on 2-D tensors; transposed operands are read in place.
fn gemm_2d<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    transpose_a: bool,
    transpose_b: bool,
) -> Tensor<B, 2> {
    route!(B, fast_gemm_2d, (a, b, transpose_a, transpose_b));
    let a = if transpose_a { a.transpose() } else { a };
    let b = if transpose_b { b.transpose() } else { b };
    a.matmul(b)
}

/// `x [m, k] @ w [k, n]` as a single GEMM.
pub fn matmul_2d<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    gemm_2d(x, w, false, false)
}

/// A linear map without bias on `x [rows, in]` with an HF-layout weight `[out, in]`, read through
/// a transposed view (no copy).
pub fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    gemm_2d(x, weight, false, true)
}

/// `a^T @ b` for `a [k, m]`, `b [k, n]` (weight gradients), reading `a` through a transposed view.
pub fn matmul_tn<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    gemm_2d(a, b, true, false)
}

/// Mean cross-entropy of `hidden [n, d] @ weight [v, d]^T` against `labels [n]`, `chunk` tokens
/// at a time, ignoring labels equal to -100 (a one-element f32 tensor; 0 when every label is
/// ignored). The `[n, v]` logits are never held at once: under `Autodiff` the backward pass
/// recomputes them chunk by chunk.
pub fn linear_cross_entropy<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    chunk: usize,
) -> Tensor<B, 1> {
    let chunk = chunk.max(1);
    route!(B, fast_cross_entropy, (hidden, weight, labels, chunk));
    // A backend outside the list: the same formulation through burn's autodiff.
    cross_entropy::reference::<B>(hidden, weight, labels)
}

fn fast_token_logps<F: FastOps>(
    hidden: Tensor<F, 2>,
    weight: Tensor<F, 2>,
    targets: Tensor<F, 1, Int>,
    temperature: f64,
    chunk: usize,
) -> Tensor<F, 1> {
    let dtype = hidden.dtype();
    let out = F::fast_linear_token_logps(
        hidden.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        targets.into_primitive(),
        temperature,
        chunk,
    );
    Tensor::<F, 1>::from_primitive(TensorPrimitive::Float(out)).cast(dtype)
}

/// Log-probabilities of `targets [n]` under `softmax(hidden [n, d] @ weight [v, d]^T /
/// temperature)`, `[n]` in the hidden states' type (0 where a target is negative), `chunk`
/// tokens at a time: the `[n, v]` logits are never held at once, and under `Autodiff` the
/// backward pass recomputes them chunk by chunk (see [`token_logps`]).
pub fn linear_token_logps<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    temperature: f64,
    chunk: usize,
) -> Tensor<B, 1> {
    let chunk = chunk.max(1);
    route!(
        B,
        fast_token_logps,
        (hidden, weight, targets, temperature, chunk)
    );
    // A backend outside the list: the full logits through burn's autodiff.
    let dtype = hidden.dtype();
    token_logps::reference::<B>(hidden, weight, targets, temperature).cast(dtype)
}

fn fast_cross_entropy_rows<F: FastOps>(
    logits: Tensor<F, 2>,
    labels: Tensor<F, 1, Int>,
    inv_count: Tensor<F, 1>,
    want_grad: bool,
) -> (Tensor<F, 1>, Option<Tensor<F, 2>>) {
    let (loss, grad) = F::fast_cross_entropy_rows(
        logits.into_primitive().tensor(),
        labels.into_primitive(),
        inv_count.into_primitive().tensor(),
        want_grad,
    );
    (
        Tensor::from_primitive(TensorPrimitive::Float(loss)),
        grad.map(|g| Tensor::from_primitive(TensorPrimitive::Float(g))),
    )
}

/// Per-row cross-entropy losses (f32) of a chunk of `logits [rows, vocab]` against `labels`
/// (negative: ignored) and, with `want_grad`, the gradient of `sum(losses) * inv_count` for the
/// logits (in their type): one kernel on burn-cuda (see [`cross_entropy::rows_reference`]).
pub fn cross_entropy_rows<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    inv_count: Tensor<B, 1>,
    want_grad: bool,
) -> (Tensor<B, 1>, Option<Tensor<B, 2>>) {
    route!(
        B,
        fast_cross_entropy_rows,
        (logits, labels, inv_count, want_grad)
    );
    cross_entropy::rows_reference::<B>(logits, labels, inv_count, want_grad)
}

fn fast_adamw_many<F: FastOps>(
    params: Vec<AdamwTensors<FloatTensor<F>>>,
    grad_scale: Option<FloatTensor<F>>,
) -> Vec<AdamwUpdated<FloatTensor<F>>> {
    F::fast_adamw_many(params, grad_scale)
}

/// AdamW updates of many parameters (see [`crate::backend::adamw`]): each one's weights and
/// moments in the update's precision, its gradient in the parameter's type, any shape (moments
/// may be flat: only the element counts must agree). A few kernel launches for all of them on
/// burn-cuda, with no reshape or other graph operation per tensor; burn's operations elsewhere.
/// Results in order, each in its weights' shape.
pub fn adamw_update_many<B: Backend>(
    params: Vec<AdamwTensors<FloatTensor<B>>>,
    grad_scale: Option<FloatTensor<B>>,
) -> Vec<AdamwUpdated<FloatTensor<B>>> {
    route!(B, fast_adamw_many, (params, grad_scale));
    crate::backend::adamw::composed_many::<B>(params, grad_scale)
}

fn fast_sum_squares<F: FastOps>(tensors: Vec<FloatTensor<F>>, device: F::Device) -> FloatTensor<F> {
    F::fast_sum_squares(tensors, &device)
}

/// The sum of squares of every element of `tensors` (any shapes), as a `[1]` f32 tensor (the
/// squared global norm of gradients): one pass over all of them on burn-cuda, in a fixed order.
pub fn sum_squares<B: Backend>(tensors: Vec<FloatTensor<B>>, device: &B::Device) -> Tensor<B, 1> {
    let device = device.clone();
    let sum = (|| {
        route!(B, fast_sum_squares, (tensors, device));
        crate::backend::adamw::composed_sum_squares::<B>(tensors, &device)
    })();
    Tensor::from_primitive(TensorPrimitive::Float(sum))
}

fn fast_lora_linear<F: FastOps>(
    x: Tensor<F, 2>,
    weight: Tensor<F, 2>,
    a: Tensor<F, 2>,
    b: Tensor<F, 2>,
    scale: f64,
) -> Tensor<F, 2> {
    let out = F::fast_lora_linear(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        a.into_primitive().tensor(),
        b.into_primitive().tensor(),
        scale,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The LoRA projection `x W^T + scale (x A^T) B^T` (`x [n, in]`, `W [out, in]`, `A [r, in]`,
/// `B [out, r]`); under `Autodiff` one node (see [`crate::backend::lora`]).
pub fn lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    route!(B, fast_lora_linear, (x, weight, a, b, scale));
    let low = linear(linear(x.clone(), a), b);
    linear(x, weight).add(low.mul_scalar(scale))
}

fn fast_swiglu_linear<F: FastOps>(
    gate: Tensor<F, 2>,
    up: Tensor<F, 2>,
    weight: Tensor<F, 2>,
    adapter: Option<(Tensor<F, 2>, Tensor<F, 2>)>,
    scale: f64,
) -> Tensor<F, 2> {
    let (gate, up, weight) = (
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    );
    let out = match adapter {
        Some((a, b)) => F::fast_swiglu_lora_linear(
            gate,
            up,
            weight,
            a.into_primitive().tensor(),
            b.into_primitive().tensor(),
            scale,
        ),
        None => F::fast_swiglu_linear(gate, up, weight),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `silu(gate) up` through a projection: `W [out, inter]` and, with `adapter = (A [r, inter],
/// B [out, r])`, its LoRA term times `scale`. Under `Autodiff` one node that recomputes the
/// SwiGLU product in its backward step instead of keeping it (see
/// [`FastOps::fast_swiglu_lora_linear`]).
pub fn swiglu_linear<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    adapter: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    scale: f64,
) -> Tensor<B, 2> {
    route!(B, fast_swiglu_linear, (gate, up, weight, adapter, scale));
    let h = composed_swiglu(gate, up);
    match adapter {
        Some((a, b)) => lora_linear(h, weight, a, b, scale),
        None => linear(h, weight),
    }
}

/// The primitives of an NF4 weight's tensors.
fn nf4_parts<B: Backend>(
    packed: Tensor<B, 1, Int>,
    absmax_codes: Tensor<B, 1, Int>,
    absmax_scales: Tensor<B, 1>,
    code: Tensor<B, 1>,
    dynamic: Tensor<B, 1>,
    offset: f64,
    shape: [usize; 2],
) -> crate::backend::nf4::Nf4Parts<B> {
    crate::backend::nf4::Nf4Parts {
        packed: packed.into_primitive(),
        absmax_codes: absmax_codes.into_primitive(),
        absmax_scales: absmax_scales.into_primitive().tensor(),
        code: code.into_primitive().tensor(),
        dynamic: dynamic.into_primitive().tensor(),
        offset,
        shape,
    }
}

fn fast_nf4_dequantize<F: FastOps>(
    packed: Tensor<F, 1, Int>,
    absmax_codes: Tensor<F, 1, Int>,
    absmax_scales: Tensor<F, 1>,
    code: Tensor<F, 1>,
    dynamic: Tensor<F, 1>,
    offset: f64,
    shape: [usize; 2],
) -> Tensor<F, 2> {
    let parts = nf4_parts(
        packed,
        absmax_codes,
        absmax_scales,
        code,
        dynamic,
        offset,
        shape,
    );
    Tensor::from_primitive(TensorPrimitive::Float(F::fast_nf4_dequantize(parts)))
}

/// The dense `[out, in]` weight of an NF4 base from its device tensors (see
/// [`crate::backend::nf4`]); one kernel on CUDA.
pub fn nf4_dequantize<B: Backend>(
    packed: Tensor<B, 1, Int>,
    absmax_codes: Tensor<B, 1, Int>,
    absmax_scales: Tensor<B, 1>,
    code: Tensor<B, 1>,
    dynamic: Tensor<B, 1>,
    offset: f64,
    shape: [usize; 2],
) -> Tensor<B, 2> {
    route!(
        B,
        fast_nf4_dequantize,
        (
            packed,
            absmax_codes,
            absmax_scales,
            code,
            dynamic,
            offset,
            shape
        )
    );
    let parts = nf4_parts(
        packed,
        absmax_codes,
        absmax_scales,
        code,
        dynamic,
        offset,
        shape,
    );
    Tensor::from_primitive(TensorPrimitive::Float(crate::backend::nf4::composed::<B>(
        parts,
    )))
}

fn memory_used<F: FastOps>() -> Option<usize> {
    F::accelerator_memory_used()
}

fn accelerator_memory_bytes<B: Backend>() -> Option<usize> {
    route!(B, memory_used, ());
    None
}

fn memory_peak<F: FastOps>() -> Option<usize> {
    F::accelerator_memory_peak()
}

fn memory_peak_reset<F: FastOps>() {
    F::reset_accelerator_memory_peak()
}

/// The most device memory held by live buffers at once (MiB; as
/// `torch.cuda.max_memory_allocated`) since [`reset_accelerator_peak`], when `B` is one of
/// runner's CUDA backends; `None` on the CPU.
pub fn accelerator_peak_mb<B: Backend>() -> Option<f64> {
    let bytes: Option<usize> = (|| {
        route!(B, memory_peak, ());
        None
    })();
    bytes.map(|bytes| bytes as f64 / f64::from(1u32 << 20))
}

/// Starts measuring [`accelerator_peak_mb`] afresh (nothing on the CPU).
pub fn reset_accelerator_peak<B: Backend>() {
    route!(B, memory_peak_reset, ());
}

/// Device memory in use (MiB, as `cuMemGetInfo` counts it: cubecl's pools and cuBLAS's
/// workspaces included, so it tracks the high-water mark) when `B` is one of runner's CUDA
/// backends; `None` on the CPU.
pub fn accelerator_memory_mb<B: Backend>() -> Option<f64> {
    accelerator_memory_bytes::<B>().map(|bytes| bytes as f64 / f64::from(1u32 << 20))
}

fn copy_into<F: FastOps>(x: FloatTensor<F>, dst: u64) -> bool {
    F::fast_copy_to_device(x, dst)
}

/// Queues a copy of `x` (contiguous, its own dtype) into CUDA device 0's memory at `dst`, which
/// must hold it, when `B` is one of runner's CUDA backends (`true`; `B::sync` waits for it);
/// `false` elsewhere. A decode engine's weights are filled this way without a host round trip.
pub fn copy_to_device_memory<B: Backend, const D: usize>(x: Tensor<B, D>, dst: u64) -> bool {
    let x = x.into_primitive().tensor();
    route!(B, copy_into, (x, dst));
    false
}

fn host_f32_of<F: FastOps>(x: FloatTensor<F>) -> Option<Vec<f32>> {
    F::fast_host_f32(x)
}

/// `x`'s values as f32, row-major: on the CPU backend a copy of its memory (burn-ndarray's
/// `into_data` walks a tensor the model still shares, such as a weight, element by element
/// through dynamic indices, seconds for a 135M model), elsewhere through `into_data`.
pub fn host_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    let values: Option<Vec<f32>> = (|| {
        let x = x.clone().into_primitive().tensor();
        route!(B, host_f32_of, (x));
        None
    })();
    values.unwrap_or_else(|| {
        x.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 values after convert")
    })
}

fn fast_checkpointed<F: FastOps>(
    inputs: Vec<Tensor<F, 3>>,
    layer: Box<dyn LayerReplay<F>>,
    offload: bool,
) -> Tensor<F, 3> {
    let inputs = inputs
        .into_iter()
        .map(|x| x.into_primitive().tensor())
        .collect();
    Tensor::from_primitive(TensorPrimitive::Float(F::fast_checkpointed(
        inputs, layer, offload,
    )))
}

/// See [`crate::backend::checkpoint::checkpointed`]; any other backend runs the layer plainly.
pub(crate) fn checkpointed_layer<B: Backend>(
    inputs: Vec<Tensor<B, 3>>,
    layer: Box<dyn LayerReplay<B>>,
    offload: bool,
) -> Tensor<B, 3> {
    route!(B, fast_checkpointed, (inputs, layer, offload));
    crate::backend::checkpoint::run_plain(inputs, layer)
}
