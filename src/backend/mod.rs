//! Fast kernels behind one generic API: batched matmul (cuBLAS on burn-cuda, burn's matmul
//! elsewhere), cross-entropy over a large vocabulary in chunks (the full logits tensor is never
//! held), and scaled dot-product attention with causal, GQA, padding and KV-cache offsets.
//!
//! Each operation is a method of [`FastOps`], implemented for burn-cuda's backends (with and
//! without `Fusion`), for `NdArray`, and for `Autodiff<B>` with its own backward. Model code stays
//! generic over plain `Backend`: the functions below look the concrete backend up by `TypeId`
//! among those runner instantiates (see [`dispatch`]) and fall back to burn's own operations for
//! any other, so one code path runs on CPU in tests and on CUDA in production.
//!
//! References: burn `examples/custom-cubecl-kernel` (custom op + backward, v0.21.0); cuBLAS
//! (docs.nvidia.com/cuda/cublas); the chunked loss follows Liger-Kernel's
//! `fused_linear_cross_entropy` (recompute logits per chunk in the backward pass); GRPO's
//! per-token log-probabilities go through the LM head the same way ([`token_logps`]).

pub mod adamw;
pub mod attention;
mod autodiff;
#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod check;
pub mod checkpoint;
mod cpu;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dispatch;
#[cfg(feature = "profile")]
pub mod host_profile;
pub mod lora;
pub mod memory;
pub mod nf4;
pub mod offload;
pub mod token_logps;

use burn::tensor::{
    backend::Backend,
    ops::{BoolTensor, FloatTensor, IntTensor},
    Bool, DType, Tensor, TensorMetadata, TensorPrimitive,
};

/// Errors of the fast-kernel layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CUDA driver or library call failed.
    #[error("CUDA call `{call}` failed: {detail}")]
    Cuda { call: &'static str, detail: String },
    /// The process-wide cuBLAS state was poisoned by a panic in another thread.
    #[error("the cuBLAS state lock was poisoned by a panic in another thread")]
    Poisoned,
    /// Operand shapes do not fit together.
    #[error("{op}: {what}: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        what: &'static str,
        expected: String,
        got: String,
    },
}

/// The options of a fused attention call: softmax scale and causal masking, where the `t`
/// queries are the last `t` of the `s` key positions (query `i` sees keys `0..=s - t + i`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedAttentionSpec {
    pub scale: f64,
    pub causal: bool,
}

/// Backends with fast paths for the heavy operations of a fine-tuning step. The default bodies
/// are burn's own operations, so a backend without fast kernels opts in with an empty `impl`.
pub trait FastOps: Backend {
    /// `lhs [b, m, k] @ rhs [b, k, n]`; either batch may be 1 and broadcasts.
    fn fast_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `op(a) @ op(b)` for 2-D operands, `op` transposing where asked (`[m, k] @ [k, n]` after
    /// the transposes). The default adds a batch axis before transposing (a free reshape of a
    /// contiguous tensor on GPU backends) and calls [`FastOps::fast_matmul`]; ndarray, whose
    /// reshape copies, reads the transposed operands as strided views instead.
    fn fast_gemm_2d(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        let batch = |t: FloatTensor<Self>, transpose: bool| {
            let shape = t.shape();
            let t = Self::float_reshape(t, burn::tensor::Shape::new([1, shape[0], shape[1]]));
            if transpose {
                Self::float_swap_dims(t, 1, 2)
            } else {
                t
            }
        };
        let out = Self::fast_matmul(batch(a, transpose_a), batch(b, transpose_b));
        let shape = out.shape();
        Self::float_reshape(out, burn::tensor::Shape::new([shape[1], shape[2]]))
    }

    /// The LoRA projection `x W^T + scale (x A^T) B^T` for `x [n, in]`, `W [out, in]`,
    /// `A [r, in]`, `B [out, r]` (see [`lora`]). Under `Autodiff` one node that keeps its four
    /// inputs.
    fn fast_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        lora::composed_forward::<Self>(x, weight, a, b, scale)
    }

    /// The MLP's output projection of its SwiGLU, `silu(gate) up W^T + scale (silu(gate) up A^T)
    /// B^T` (`gate`, `up [n, inter]`). Under `Autodiff` one node that keeps `gate` and `up`
    /// (which SwiGLU's own backward needs anyway) and recomputes the product in its backward
    /// step, so the `[n, inter]` product is never held for the backward pass (Unsloth's
    /// `fast_lora.py` does the same).
    fn fast_swiglu_lora_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::fast_lora_linear(Self::fast_swiglu(gate, up), weight, a, b, scale)
    }

    /// [`FastOps::fast_swiglu_lora_linear`] without an adapter: `silu(gate) up W^T`, the
    /// product recomputed in the backward step when `W` needs its gradient.
    fn fast_swiglu_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::fast_gemm_2d(Self::fast_swiglu(gate, up), weight, false, true)
    }

    /// The dense `[out, in]` weight of an NF4 base (see [`nf4`]), in the float type of its
    /// `code` table. Under `Autodiff` a constant (NF4 weights are frozen).
    fn fast_nf4_dequantize(parts: nf4::Nf4Parts<Self>) -> FloatTensor<Self> {
        nf4::composed::<Self>(parts)
    }

    /// The gradients of [`FastOps::fast_lora_linear`] that `wanted` asks for, from the output's
    /// gradient `dy [n, out]`.
    #[allow(clippy::too_many_arguments)]
    fn fast_lora_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
        dy: FloatTensor<Self>,
        wanted: lora::LoraGrads,
    ) -> lora::LoraGradients<Self> {
        lora::composed_backward::<Self>(x, weight, a, b, scale, dy, wanted)
    }

    /// `softmax(scores * scale)` over the last axis, with `masked_value` in place of the scaled
    /// score wherever `mask` is true (`mask` has the shape of `scores`). Under `Autodiff` it is
    /// one node that keeps only its output: the backward pass is `scale * p * (g - sum(g * p))`,
    /// where the composed ops kept the exponentials as well and took about ten passes.
    fn fast_masked_softmax(
        scores: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        scale: f64,
        masked_value: f64,
    ) -> FloatTensor<Self> {
        dispatch::composed_masked_softmax(
            Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(scores)),
            mask.map(Tensor::<Self, 4, Bool>::from_primitive),
            scale,
            masked_value,
        )
        .into_primitive()
        .tensor()
    }

    /// The first `len` positions of axis 1 of `x [rows, positions, d]` (a KV cache's filled
    /// part). burn-ndarray's slice copies, so the CPU backend returns a view of the same buffer.
    fn fast_narrow(x: FloatTensor<Self>, len: usize) -> FloatTensor<Self> {
        let x = Tensor::<Self, 3>::from_primitive(TensorPrimitive::Float(x));
        x.narrow(1, 0, len).into_primitive().tensor()
    }

    /// `silu(gate) * up` (the SwiGLU of Llama/Qwen2 MLPs). Under `Autodiff` one node that keeps
    /// only `gate` and `up`; the composed ops kept `silu(gate)` and the sigmoid as well, each as
    /// large as the MLP's intermediate activations.
    fn fast_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let gate = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(gate));
        let up = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(up));
        dispatch::composed_swiglu(gate, up)
            .into_primitive()
            .tensor()
    }

    /// RMSNorm `x / sqrt(mean(x^2) + eps) * weight` over the last axis of `x [rows, hidden]`.
    /// Under `Autodiff` one node that keeps `x` and one inverse RMS per row.
    fn fast_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        Self::fast_rms_norm_forward(x, weight, eps).0
    }

    /// RMSNorm's output and the inverse RMS per row (`[rows, 1]`, in x's type or f32).
    fn fast_rms_norm_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let weight = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(weight));
        let (y, inv) = dispatch::composed_rms_norm(x, weight, eps);
        (y.into_primitive().tensor(), inv.into_primitive().tensor())
    }

    /// RMSNorm's gradients for x and the weight, where wanted, from the output's gradient `dy`
    /// and the forward's inverse RMS.
    fn fast_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        wanted: (bool, bool),
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        dispatch::composed_rms_norm_backward::<Self>(x, weight, inv_rms, dy, wanted)
    }

    /// Rotary position embedding `x cos + rotate_half(x) sin` of `x [b, h, t, d]` with `cos`,
    /// `sin [1 | b, 1, t, d]`; with `backward`, the gradient of that for `x` where `x` holds
    /// the output's gradient. Under `Autodiff` one node that keeps cos and sin.
    fn fast_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        backward: bool,
    ) -> FloatTensor<Self> {
        dispatch::composed_rope_primitive::<Self>(x, cos, sin, backward)
    }

    /// Whether [`FastOps::fast_attention`] runs a fused kernel for this element type and head
    /// size. Where it does not, model code uses the composed attention (score matrix and
    /// [`FastOps::fast_masked_softmax`]), which is faster on the CPU.
    fn fused_attention_supported(_dtype: DType, _head_dim: usize) -> bool {
        false
    }

    /// Attention that never holds the score matrix: `q [b, h, t, d]`, `k`, `v [b, kvh, s, d]`
    /// (query head `i` reads KV head `i / (h / kvh)`), `key_valid [b, s]` (0 = padding, never
    /// attended) -> `[b, t, h, d]`. A query that sees no key gets 0. Under `Autodiff` it is one
    /// node that keeps q, k, v, the output and one log-sum-exp per query row.
    fn fast_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_valid: Option<IntTensor<Self>>,
        spec: FusedAttentionSpec,
    ) -> FloatTensor<Self> {
        Self::fast_attention_with_lse(q, k, v, key_valid, spec).0
    }

    /// [`FastOps::fast_attention`] and the natural-log log-sum-exp of each query row's scaled
    /// scores, `[b, h, t]` f32 (+inf where the row sees no key). The default composes burn ops
    /// (the reference the kernels are checked against).
    fn fast_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_valid: Option<IntTensor<Self>>,
        spec: FusedAttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention::reference_forward_primitive::<Self>(q, k, v, key_valid, spec)
    }

    /// Gradients of q, k and v from the forward's output and log-sum-exp and the output's
    /// gradient `dout [b, t, h, d]` (probabilities recomputed, as FlashAttention-2's backward).
    #[allow(clippy::too_many_arguments)]
    fn fast_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        key_valid: Option<IntTensor<Self>>,
        spec: FusedAttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        attention::reference_backward_primitive::<Self>(q, k, v, o, lse, dout, key_valid, spec)
    }

    /// AdamW updates of many flat parameters at once (see [`adamw`]): each one's `weights`,
    /// `exp_avg` and `exp_avg_sq` in the update's precision, `grad` in the parameter's type;
    /// `grad_scale` a `[1]` tensor multiplying every gradient. Returns, in order, the new weights
    /// and moments, and the weights cast to `low` where asked (the parameter's own type under
    /// mixed precision).
    fn fast_adamw_many(
        params: Vec<adamw::AdamwTensors<FloatTensor<Self>>>,
        grad_scale: Option<FloatTensor<Self>>,
    ) -> Vec<adamw::AdamwUpdated<FloatTensor<Self>>> {
        adamw::composed_many::<Self>(params, grad_scale)
    }

    /// The sum of squares of all elements of the flat `tensors`, as a `[1]` f32 tensor on
    /// `device` (global-norm clipping).
    fn fast_sum_squares(
        tensors: Vec<FloatTensor<Self>>,
        device: &Self::Device,
    ) -> FloatTensor<Self> {
        adamw::composed_sum_squares::<Self>(tensors, device)
    }

    /// Starts copying a `[rows, seq, width]` tensor to host memory (see [`offload`]); the
    /// default copies before it returns.
    fn fast_offload(x: FloatTensor<Self>) -> offload::Offloaded<Self> {
        let x = checkpoint::float::<Self, 3>(x);
        let device = x.device();
        offload::Offloaded::ready(x.into_data(), device)
    }

    /// Queues a copy of `x`'s values (made contiguous, in its own dtype) into device memory at
    /// `dst` on CUDA device 0, which must hold that many bytes, and returns `true`; the copy is
    /// ordered after the work that wrote `x`, and `Backend::sync` waits for it. `false` (nothing
    /// copied) where tensors do not live in CUDA memory.
    fn fast_copy_to_device(_x: FloatTensor<Self>, _dst: u64) -> bool {
        false
    }

    /// `x`'s values as f32 in row-major order, read where they lie, when this backend keeps
    /// f32 tensors in host memory; `None` elsewhere (the caller goes through `into_data`).
    fn fast_host_f32(_x: FloatTensor<Self>) -> Option<Vec<f32>> {
        None
    }

    /// A layer run as an activation checkpoint (see [`checkpoint`]). Backends that record no
    /// graph run it plainly; `Autodiff` keeps only the inputs and recomputes the layer in its
    /// backward step.
    fn fast_checkpointed(
        inputs: Vec<FloatTensor<Self>>,
        layer: Box<dyn checkpoint::LayerReplay<Self>>,
        offload: bool,
    ) -> FloatTensor<Self> {
        let _ = offload;
        let inputs = inputs.into_iter().map(checkpoint::float).collect();
        checkpoint::run_plain(inputs, layer)
            .into_primitive()
            .tensor()
    }

    /// Bytes of accelerator memory in use (`None` on the CPU): reported in training metrics.
    fn accelerator_memory_used() -> Option<usize> {
        None
    }

    /// The most accelerator memory held by live buffers at once (not the pool's reserve; as
    /// `torch.cuda.max_memory_allocated`) since [`FastOps::reset_accelerator_memory_peak`]
    /// (`None` on the CPU).
    fn accelerator_memory_peak() -> Option<usize> {
        None
    }

    /// Starts measuring [`FastOps::accelerator_memory_peak`] afresh.
    fn reset_accelerator_memory_peak() {}

    /// Per-row cross-entropy of a chunk of logits and, with `want_grad`, its gradient for
    /// the logits (see [`cross_entropy::rows_reference`], which is the default).
    fn fast_cross_entropy_rows(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        inv_count: FloatTensor<Self>,
        want_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        cross_entropy::rows_reference_primitive::<Self>(logits, labels, inv_count, want_grad)
    }

    /// Mean token cross-entropy of `hidden [n, d] @ weight[v, d]^T` against `labels [n]`
    /// (entries equal to [`cross_entropy::IGNORE_INDEX`] are skipped), computed `chunk` rows
    /// at a time. Returns a one-element f32 tensor.
    fn fast_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        labels: IntTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let out = cross_entropy::forward::<Self>(
            Tensor::from_primitive(TensorPrimitive::Float(hidden)),
            Tensor::from_primitive(TensorPrimitive::Float(weight)),
            Tensor::from_primitive(labels),
            chunk,
            false,
            false,
        );
        out.loss.into_primitive().tensor()
    }

    /// Log-probabilities (f32, `[n]`) of `targets [n]` under `softmax(hidden [n, d] @ weight
    /// [v, d]^T / temperature)`, `chunk` rows at a time (see [`token_logps`]; negative targets
    /// give 0). Under `Autodiff` the backward pass recomputes the logits chunk by chunk.
    fn fast_linear_token_logps(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f64,
        chunk: usize,
    ) -> FloatTensor<Self> {
        Self::fast_token_logps_forward(hidden, weight, targets, temperature, chunk).0
    }

    /// [`token_logps::forward`]: the log-probabilities and each row's log-sum-exp (both f32).
    fn fast_token_logps_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f64,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        token_logps::forward_primitive::<Self>(hidden, weight, targets, temperature, chunk)
    }

    /// [`token_logps::backward`]: the gradients of `sum(upstream * logp)` for the hidden states
    /// and the weight that `want` asks for.
    #[allow(clippy::too_many_arguments)]
    fn fast_token_logps_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        temperature: f64,
        chunk: usize,
        want: (bool, bool),
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        token_logps::backward_primitive::<Self>(
            hidden,
            weight,
            targets,
            lse,
            upstream,
            temperature,
            chunk,
            want,
        )
    }
}

/// The optimizer step (counted from 1) whose kernels a profiler should see: `RUNNER_PROFILE_STEP`
/// in the environment. The trainer brackets that step with [`set_profiler`], so
/// `ncu --profile-from-start off` measures one warm step and nothing else.
pub fn profiled_step() -> Option<u64> {
    static STEP: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *STEP.get_or_init(|| {
        std::env::var("RUNNER_PROFILE_STEP")
            .ok()
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Starts or stops the CUDA profiler (a no-op without CUDA); failures are logged, not raised,
/// since profiling never changes a result.
pub fn set_profiler(on: bool) {
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::set_profiler(on) {
        tracing::warn!("profiler range: {e}");
    }
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

pub use dispatch::{
    accelerator_memory_mb, accelerator_peak_mb, adamw_update_many, copy_to_device_memory,
    cross_entropy_rows, fused_attention, fused_attention_supported, host_f32, linear,
    linear_cross_entropy, linear_token_logps, lora_linear, masked_softmax, matmul, matmul_2d,
    matmul_tn, narrow, nf4_dequantize, reset_accelerator_peak, rms_norm, rope, sum_squares, swiglu,
    swiglu_linear,
};

#[cfg(test)]
mod tests;
