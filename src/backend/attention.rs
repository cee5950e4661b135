//! Scaled dot-product attention, `softmax(Q K^T / sqrt(d) + mask) V`, with grouped-query heads,
//! causal masking aligned to the end of the keys (so one call serves training, prefill and
//! decode over a KV cache), and key padding. Built from [`crate::backend::matmul`] and burn ops,
//! so it runs and differentiates on every backend; on CUDA both GEMMs go to cuBLAS.
//! It materializes the `[.., q_len, k_len]` score matrix; [`crate::backend::fused_attention`]
//! does not (its composed reference, in f32, is at the end of this file).
//!
//! Reference: HF transformers `modeling_qwen2.py` (`repeat_kv`, `eager_attention_forward`);
//! PyTorch `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`.

use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, IntTensor},
    Bool, DType, FloatDType, Int, Tensor, TensorPrimitive,
};

use crate::backend::{masked_softmax, matmul, Error};

/// Options of [`attention`].
#[derive(Clone, Debug)]
pub struct AttentionOptions<B: Backend> {
    /// Causal mask; query `i` of `q_len` sits at key position `k_len - q_len + i`.
    pub causal: bool,
    /// `[batch, k_len]`, true where the key is padding and must not be attended to.
    pub key_padding: Option<Tensor<B, 2, Bool>>,
    /// Softmax scale; `1/sqrt(head_dim)` when `None`.
    pub scale: Option<f64>,
}

impl<B: Backend> Default for AttentionOptions<B> {
    fn default() -> Self {
        Self {
            causal: true,
            key_padding: None,
            scale: None,
        }
    }
}

/// `q [batch, q_heads, q_len, d]`, `k`, `v [batch, kv_heads, k_len, d]` -> `[batch, q_heads,
/// q_len, d]`. Query head `h` reads KV head `h / (q_heads / kv_heads)`, as HF's `repeat_kv`.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    options: AttentionOptions<B>,
) -> Result<Tensor<B, 4>, Error> {
    let [batch, q_heads, q_len, head_dim] = q.dims();
    let [kb, kv_heads, k_len, kd] = k.dims();
    if kb != batch || kd != head_dim || v.dims() != k.dims() {
        return Err(Error::Shape {
            op: "attention",
            what: "k/v shape",
            expected: format!("[{batch}, kv_heads, k_len, {head_dim}] for both k and v"),
            got: format!("k {:?}, v {:?}", k.dims(), v.dims()),
        });
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 || k_len < q_len {
        return Err(Error::Shape {
            op: "attention",
            what: "heads / lengths",
            expected: "q_heads a multiple of kv_heads and k_len >= q_len".into(),
            got: format!("q_heads {q_heads}, kv_heads {kv_heads}, q_len {q_len}, k_len {k_len}"),
        });
    }
    let group = q_heads / kv_heads;
    let device = q.device();
    let dtype: DType = q.dtype();
    let scale = options.scale.unwrap_or(1.0 / (head_dim as f64).sqrt());

    // The `group` query heads that share a KV head become extra rows of one GEMM: no KV copies.
    let rows = group * q_len;
    let q = q.reshape([batch * kv_heads, rows, head_dim]);
    let k = k.reshape([batch * kv_heads, k_len, head_dim]);
    let v = v.reshape([batch * kv_heads, k_len, head_dim]);
    let scores = matmul(q, k.swap_dims(1, 2));
    // Half-precision scores are widened for the softmax; f32 and f64 stay as they are.
    let scores = match dtype {
        DType::BF16 | DType::F16 => scores.cast(FloatDType::F32),
        _ => scores,
    };

    let mut mask: Option<Tensor<B, 3, Bool>> = None;
    if options.causal {
        let offset = (k_len - q_len) as i64;
        let query_pos = Tensor::<B, 1, Int>::arange(0..q_len as i64, &device)
            .add_scalar(offset)
            .reshape([1, q_len, 1])
            .repeat_dim(0, group)
            .reshape([1, rows, 1]);
        let key_pos = Tensor::<B, 1, Int>::arange(0..k_len as i64, &device).reshape([1, 1, k_len]);
        mask = Some(
            key_pos
                .greater(query_pos)
                .expand([batch * kv_heads, rows, k_len]),
        );
    }
    if let Some(padding) = options.key_padding {
        let padding = padding
            .reshape([batch, 1, 1, k_len])
            .expand([batch, kv_heads, 1, k_len])
            .reshape([batch * kv_heads, 1, k_len])
            .expand([batch * kv_heads, rows, k_len]);
        mask = Some(match mask {
            Some(m) => m.bool_or(padding),
            None => padding,
        });
    }
    let lead = batch * kv_heads;
    // A finite fill keeps fully masked (padding) rows at a uniform softmax instead of NaN.
    let probs = masked_softmax(
        scores.reshape([1, lead, rows, k_len]),
        mask.map(|m| m.reshape([1, lead, rows, k_len])),
        scale,
        -1.0e30,
    )
    .reshape([lead, rows, k_len])
    .cast(dtype);
    let out = matmul(probs, v);
    Ok(out.reshape([batch, q_heads, q_len, head_dim]))
}

/// `[b, kvh, rep * t, s]`, true where a query row must not see a key: causal (query position
/// `p = row % t` sees keys `0..=s - t + p`) and key padding (`key_valid == 0`).
fn hidden_keys<B: Backend>(
    [b, kvh, rep, t, s]: [usize; 5],
    key_valid: Option<Tensor<B, 2, Int>>,
    causal: bool,
    device: &B::Device,
) -> Option<Tensor<B, 4, Bool>> {
    let causal = causal.then(|| {
        Tensor::<B, 2, Bool>::tril_mask([t, s], (s - t) as i64, device)
            .reshape([1, 1, 1, t, s])
            .expand([b, kvh, rep, t, s])
            .reshape([b, kvh, rep * t, s])
    });
    let padding = key_valid.map(|m| {
        m.equal_elem(0)
            .reshape([b, 1, 1, s])
            .expand([b, kvh, rep * t, s])
    });
    match (causal, padding) {
        (Some(c), Some(p)) => Some(c.bool_or(p)),
        (c, p) => c.or(p),
    }
}

/// The math of [`crate::backend::fused_attention`] from burn ops, in f32: `(o [b, t, h, d] in
/// q's dtype, lse [b, h, t] f32)`. The kernels are checked against it; backends without a
/// fused kernel run it.
pub(crate) fn reference_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_valid: Option<Tensor<B, 2, Int>>,
    spec: crate::backend::FusedAttentionSpec,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let dtype = q.dtype();
    let [b, h, t, d] = q.dims();
    let [_, kvh, s, _] = k.dims();
    let rep = h / kvh;
    let (probs, lse) = reference_probs(q, k, key_valid, spec, [b, kvh, rep, t, s]);
    let v = v.cast(FloatDType::F32).reshape([b * kvh, s, d]);
    let o = matmul(probs.reshape([b * kvh, rep * t, s]), v)
        .reshape([b, h, t, d])
        .swap_dims(1, 2)
        .cast(dtype);
    (o, lse.reshape([b, h, t]))
}

/// Probabilities `[b, kvh, rep * t, s]` (f32, 0 where hidden) and the log-sum-exp
/// `[b, kvh, rep * t, 1]` (+inf for rows that see no key).
fn reference_probs<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    key_valid: Option<Tensor<B, 2, Int>>,
    spec: crate::backend::FusedAttentionSpec,
    [b, kvh, rep, t, s]: [usize; 5],
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let d = q.dims()[3];
    let device = q.device();
    let q = q.cast(FloatDType::F32).reshape([b * kvh, rep * t, d]);
    let k = k.cast(FloatDType::F32).reshape([b * kvh, s, d]);
    let mut scores = matmul(q, k.swap_dims(1, 2))
        .reshape([b, kvh, rep * t, s])
        .mul_scalar(spec.scale);
    if let Some(hidden) = hidden_keys([b, kvh, rep, t, s], key_valid, spec.causal, &device) {
        scores = scores.mask_fill(hidden, f32::NEG_INFINITY);
    }
    let max = scores.clone().max_dim(3);
    let max = max
        .clone()
        .mask_fill(max.equal_elem(f32::NEG_INFINITY), 0.0);
    let exp = scores.sub(max.clone()).exp();
    let sum = exp.clone().sum_dim(3);
    let empty = sum.clone().equal_elem(0.0);
    let lse = max.add(sum.clone().log()).mask_fill(empty, f32::INFINITY);
    (exp.div(sum.clamp_min(f32::MIN_POSITIVE)), lse)
}

/// Gradients of [`reference_forward`] (`dq`, `dk`, `dv` in the inputs' dtype) from the output
/// gradient `dout [b, t, h, d]`, recomputing the probabilities from `lse` as the kernels do.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reference_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    o: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    dout: Tensor<B, 4>,
    key_valid: Option<Tensor<B, 2, Int>>,
    spec: crate::backend::FusedAttentionSpec,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let dtype = q.dtype();
    let device = q.device();
    let [b, h, t, d] = q.dims();
    let [_, kvh, s, _] = k.dims();
    let rep = h / kvh;
    let rows = rep * t;
    let f32 = |x: Tensor<B, 4>| x.cast(FloatDType::F32);
    let q3 = f32(q).reshape([b * kvh, rows, d]);
    let k3 = f32(k).reshape([b * kvh, s, d]);
    let v3 = f32(v).reshape([b * kvh, s, d]);
    let mut scores = matmul(q3.clone(), k3.clone().swap_dims(1, 2))
        .reshape([b, kvh, rows, s])
        .mul_scalar(spec.scale);
    if let Some(hidden) = hidden_keys([b, kvh, rep, t, s], key_valid, spec.causal, &device) {
        scores = scores.mask_fill(hidden, f32::NEG_INFINITY);
    }
    let probs = scores
        .sub(lse.reshape([b, kvh, rows, 1]))
        .exp()
        .reshape([b * kvh, rows, s]);
    // [b, t, h, d] -> the row layout [b * kvh, rep * t, d].
    let rows_of = |x: Tensor<B, 4>| f32(x).swap_dims(1, 2).reshape([b * kvh, rows, d]);
    let dout = rows_of(dout);
    let delta = dout.clone().mul(rows_of(o)).sum_dim(2);
    let dv = matmul(probs.clone().swap_dims(1, 2), dout.clone());
    let dp = matmul(dout, v3.swap_dims(1, 2));
    let ds = probs.mul(dp.sub(delta)).mul_scalar(spec.scale);
    let dq = matmul(ds.clone(), k3).reshape([b, h, t, d]).cast(dtype);
    let dk = matmul(ds.swap_dims(1, 2), q3)
        .reshape([b, kvh, s, d])
        .cast(dtype);
    (dq, dk, dv.reshape([b, kvh, s, d]).cast(dtype))
}

/// [`reference_forward`] on primitives (the default of [`FastOps::fast_attention_with_lse`]).
pub(crate) fn reference_forward_primitive<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    key_valid: Option<IntTensor<B>>,
    spec: crate::backend::FusedAttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let f4 = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
    let (o, lse) = reference_forward(
        f4(q),
        f4(k),
        f4(v),
        key_valid.map(Tensor::<B, 2, Int>::from_primitive),
        spec,
    );
    (o.into_primitive().tensor(), lse.into_primitive().tensor())
}

/// [`reference_backward`] on primitives (the default of [`FastOps::fast_attention_backward`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reference_backward_primitive<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    o: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    key_valid: Option<IntTensor<B>>,
    spec: crate::backend::FusedAttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let f4 = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
    let (dq, dk, dv) = reference_backward(
        f4(q),
        f4(k),
        f4(v),
        f4(o),
        Tensor::from_primitive(TensorPrimitive::Float(lse)),
        f4(dout),
        key_valid.map(Tensor::<B, 2, Int>::from_primitive),
        spec,
    );
    (
        dq.into_primitive().tensor(),
        dk.into_primitive().tensor(),
        dv.into_primitive().tensor(),
    )
}
