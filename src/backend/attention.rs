//! Scaled dot-product attention, `softmax(Q K^T / sqrt(d) + mask) V`, with grouped-query heads,
//! causal masking aligned to the end of the keys (so one call serves training, prefill and
//! decode over a KV cache), and key padding. Built from [`crate::backend::matmul`] and burn ops,
//! so it runs and differentiates on every backend; on CUDA both GEMMs go to cuBLAS.
//! It materializes the `[.., q_len, k_len]` score matrix: the fused kernel is not written yet.
//!
//! Reference: HF transformers `modeling_qwen2.py` (`repeat_kv`, `eager_attention_forward`);
//! PyTorch `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`.

use burn::tensor::{backend::Backend, Bool, DType, FloatDType, Int, Tensor};

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
