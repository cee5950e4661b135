//! `FastOps` under `Autodiff<B>`: each fast operation is one node of the autodiff graph whose
//! backward pass calls the inner backend's fast operations (cuBLAS GEMMs on transposed views,
//! the chunked cross-entropy recompute), so training never falls back to the slow paths.
//!
//! Reference: burn `examples/custom-cubecl-kernel/src/backward.rs` (v0.21.0).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{broadcast_shape, Backward, Ops, OpsKind},
    Autodiff, NodeId,
};
use burn::tensor::{
    ops::{BoolTensor, FloatTensor, IntTensor},
    Bool, DType, Shape, Tensor, TensorMetadata, TensorPrimitive,
};

use crate::backend::lora::LoraGrads;
use crate::backend::{cross_entropy, FastOps, FusedAttentionSpec};

fn float<B: FastOps, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

#[derive(Debug)]
struct MatmulBackward;

impl<B: FastOps> Backward<B, 2> for MatmulBackward {
    /// (lhs when rhs needs a gradient, rhs when lhs does, the two input shapes)
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>, Shape, Shape);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_lhs, node_rhs] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (lhs, rhs, shape_lhs, shape_rhs) = ops.state;
        if let (Some(node), Some(rhs)) = (node_lhs, rhs) {
            // dA = dC B^T, with B^T a stride view read by cuBLAS as op = T.
            let g = B::fast_matmul(grad.clone(), B::float_swap_dims(rhs, 1, 2));
            grads.register::<B>(node.id, broadcast_shape::<B>(g, &shape_lhs));
        }
        if let (Some(node), Some(lhs)) = (node_rhs, lhs) {
            let g = B::fast_matmul(B::float_swap_dims(lhs, 1, 2), grad);
            grads.register::<B>(node.id, broadcast_shape::<B>(g, &shape_rhs));
        }
    }
}

#[derive(Debug)]
struct GemmBackward;

impl<B: FastOps> Backward<B, 2> for GemmBackward {
    /// (a when b needs a gradient, b when a does, transpose_a, transpose_b)
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>, bool, bool);

    /// For `C = op(a) op(b)`: `d op(a) = dC op(b)^T`, `d op(b) = op(a)^T dC`, each written as
    /// one GEMM on the stored operands so no transpose is materialised.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (a, b, ta, tb) = ops.state;
        if let (Some(node), Some(b)) = (node_a, b) {
            let g = if ta {
                B::fast_gemm_2d(b, grad.clone(), tb, true)
            } else {
                B::fast_gemm_2d(grad.clone(), b, false, !tb)
            };
            grads.register::<B>(node.id, g);
        }
        if let (Some(node), Some(a)) = (node_b, a) {
            let g = if tb {
                B::fast_gemm_2d(grad, a, true, ta)
            } else {
                B::fast_gemm_2d(a, grad, !ta, false)
            };
            grads.register::<B>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

/// The gradients the forward pass computed for an upstream gradient of 1.
#[derive(Clone, Debug)]
struct CrossEntropyState<B: FastOps> {
    grad_hidden: Option<FloatTensor<B>>,
    grad_weight: Option<FloatTensor<B>>,
}

impl<B: FastOps> Backward<B, 2> for CrossEntropyBackward {
    type State = CrossEntropyState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_hidden, node_weight] = ops.parents;
        let upstream = float::<B, 1>(grads.consume::<B>(&ops.node));
        let s = ops.state;
        let scaled = |g: FloatTensor<B>| {
            cross_entropy::scale_by_upstream(float::<B, 2>(g), upstream.clone())
                .into_primitive()
                .tensor()
        };
        if let (Some(node), Some(g)) = (node_hidden, s.grad_hidden) {
            grads.register::<B>(node.id, scaled(g));
        }
        if let (Some(node), Some(g)) = (node_weight, s.grad_weight) {
            grads.register::<B>(node.id, scaled(g));
        }
    }
}

#[derive(Debug)]
struct TokenLogpsBackward;

/// What the backward pass recomputes each chunk's logits from.
#[derive(Clone, Debug)]
struct TokenLogpsState<B: FastOps> {
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    /// Each row's log-sum-exp of the scaled logits (f32).
    lse: FloatTensor<B>,
    temperature: f64,
    chunk: usize,
}

impl<B: FastOps> Backward<B, 2> for TokenLogpsBackward {
    type State = TokenLogpsState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_hidden, node_weight] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (grad_hidden, grad_weight) = B::fast_token_logps_backward(
            s.hidden,
            s.weight,
            s.targets,
            s.lse,
            upstream,
            s.temperature,
            s.chunk,
            (node_hidden.is_some(), node_weight.is_some()),
        );
        if let (Some(node), Some(g)) = (node_hidden, grad_hidden) {
            grads.register::<B>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_weight, grad_weight) {
            grads.register::<B>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct MaskedSoftmaxBackward;

impl<B: FastOps> Backward<B, 1> for MaskedSoftmaxBackward {
    /// (the softmax output, the mask, the scale)
    type State = (FloatTensor<B>, Option<BoolTensor<B>>, f64);

    /// `d scores = scale * p * (g - sum_j g_j p_j)`, zero where masked (as through
    /// `mask_fill`: a fully masked row is uniform, yet does not depend on its scores).
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (probs, mask, scale) = ops.state;
        if let Some(node) = node {
            let p: Tensor<B, 4> = float(probs);
            let g: Tensor<B, 4> = float(grad);
            let dot = g.clone().mul(p.clone()).sum_dim(3);
            let mut ds = p.mul(g.sub(dot)).mul_scalar(scale);
            if let Some(m) = mask {
                ds = ds.mask_fill(Tensor::<B, 4, Bool>::from_primitive(m), 0.0);
            }
            grads.register::<B>(node.id, ds.into_primitive().tensor());
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: FastOps> Backward<B, 2> for SwigluBackward {
    /// (gate, up)
    type State = (FloatTensor<B>, FloatTensor<B>);

    /// For `h = silu(g) u` with `s = sigmoid(g)`: `du = dh silu(g)`,
    /// `dg = dh u s (1 + g (1 - s))`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dh = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        register_swiglu_grads::<B>(
            grads,
            node_gate.map(|n| n.id),
            node_up.map(|n| n.id),
            gate,
            up,
            dh,
        );
    }
}

/// SwiGLU's backward step: for `h = silu(g) u` with `s = sigmoid(g)`, `du = dh silu(g)` and
/// `dg = dh u s (1 + g (1 - s))`, registered for the parents that want them.
fn register_swiglu_grads<B: FastOps>(
    grads: &mut Gradients,
    node_gate: Option<NodeId>,
    node_up: Option<NodeId>,
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    dh: FloatTensor<B>,
) {
    let dh: Tensor<B, 2> = float(dh);
    let (g, u): (Tensor<B, 2>, Tensor<B, 2>) = (float(gate), float(up));
    let s = burn::tensor::activation::sigmoid(g.clone());
    if let Some(id) = node_up {
        let du = dh.clone().mul(g.clone().mul(s.clone()));
        grads.register::<B>(id, du.into_primitive().tensor());
    }
    if let Some(id) = node_gate {
        let dsilu = s
            .clone()
            .mul(g.mul(s.neg().add_scalar(1.0)).add_scalar(1.0));
        let dg = dh.mul(u).mul(dsilu);
        grads.register::<B>(id, dg.into_primitive().tensor());
    }
}

#[derive(Debug)]
struct SwigluLoraLinearBackward;

impl<B: FastOps> Backward<B, 5> for SwigluLoraLinearBackward {
    /// (gate, up, W, A, B, scale): the SwiGLU product is recomputed here, never kept.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
    );

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up, node_w, node_a, node_b] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (gate, up, w, a, b, scale) = ops.state;
        let wanted = LoraGrads {
            x: node_gate.is_some() || node_up.is_some(),
            weight: node_w.is_some(),
            a: node_a.is_some(),
            b: node_b.is_some(),
        };
        let h = B::fast_swiglu(gate.clone(), up.clone());
        let g = B::fast_lora_linear_backward(h, w, a, b, scale, dy, wanted);
        for (node, grad) in [(node_w, g.weight), (node_a, g.a), (node_b, g.b)] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
        if let Some(dh) = g.x {
            register_swiglu_grads::<B>(
                grads,
                node_gate.map(|n| n.id),
                node_up.map(|n| n.id),
                gate,
                up,
                dh,
            );
        }
    }
}

#[derive(Debug)]
struct SwigluLinearBackward;

impl<B: FastOps> Backward<B, 3> for SwigluLinearBackward {
    /// (gate, up, W when the SwiGLU inputs need gradients): the product is recomputed for W's.
    type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (gate, up, w) = ops.state;
        if let Some(node) = node_w {
            let h = B::fast_swiglu(gate.clone(), up.clone());
            grads.register::<B>(node.id, B::fast_gemm_2d(dy.clone(), h, true, false));
        }
        if let Some(w) = w {
            let dh = B::fast_gemm_2d(dy, w, false, false);
            register_swiglu_grads::<B>(
                grads,
                node_gate.map(|n| n.id),
                node_up.map(|n| n.id),
                gate,
                up,
                dh,
            );
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: FastOps> Backward<B, 2> for RmsNormBackward {
    /// (x, weight, inverse RMS per row `[rows, 1]`)
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    /// See [`FastOps::fast_rms_norm_backward`].
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, r) = ops.state;
        let (dx, dw) = B::fast_rms_norm_backward(x, w, r, dy, (node_x.is_some(), node_w.is_some()));
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<B>(node.id, dw);
        }
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<B>(node.id, dx);
        }
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: FastOps> Backward<B, 1> for RopeBackward {
    /// (cos, sin)
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let (cos, sin) = ops.state;
            grads.register::<B>(node.id, B::fast_rope(dy, cos, sin, true));
        }
    }
}

#[derive(Debug)]
struct LoraLinearBackward;

impl<B: FastOps> Backward<B, 4> for LoraLinearBackward {
    /// (x, W, A, B, scale)
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_a, node_b] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, a, b, scale) = ops.state;
        let wanted = LoraGrads {
            x: node_x.is_some(),
            weight: node_w.is_some(),
            a: node_a.is_some(),
            b: node_b.is_some(),
        };
        let g = B::fast_lora_linear_backward(x, w, a, b, scale, dy, wanted);
        for (node, grad) in [
            (node_x, g.x),
            (node_w, g.weight),
            (node_a, g.a),
            (node_b, g.b),
        ] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct FusedAttentionBackward;

#[derive(Clone, Debug)]
struct FusedAttentionState<B: FastOps> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    o: FloatTensor<B>,
    lse: FloatTensor<B>,
    key_valid: Option<IntTensor<B>>,
    spec: FusedAttentionSpec,
}

impl<B: FastOps> Backward<B, 3> for FusedAttentionBackward {
    type State = FusedAttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) =
            B::fast_attention_backward(s.q, s.k, s.v, s.o, s.lse, grad, s.key_valid, s.spec);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: FastOps, C: CheckpointStrategy> FastOps for Autodiff<B, C> {
    fn fast_checkpointed(
        inputs: Vec<FloatTensor<Self>>,
        layer: Box<dyn crate::backend::checkpoint::LayerReplay<Self>>,
        offload: bool,
    ) -> FloatTensor<Self> {
        crate::backend::checkpoint::autodiff_checkpointed::<B, C>(inputs, layer, offload)
    }

    fn fast_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let prepared = LoraLinearBackward
            .prepare::<C>([
                x.node.clone(),
                weight.node.clone(),
                a.node.clone(),
                b.node.clone(),
            ])
            .compute_bound()
            .stateful();
        let y = B::fast_lora_linear(
            x.primitive.clone(),
            weight.primitive.clone(),
            a.primitive.clone(),
            b.primitive.clone(),
            scale,
        );
        match prepared {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    x.primitive,
                    weight.primitive,
                    a.primitive,
                    b.primitive,
                    scale,
                ),
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_nf4_dequantize(parts: crate::backend::nf4::Nf4Parts<Self>) -> FloatTensor<Self> {
        let inner = crate::backend::nf4::Nf4Parts::<B> {
            packed: parts.packed,
            absmax_codes: parts.absmax_codes,
            absmax_scales: parts.absmax_scales.primitive,
            code: parts.code.primitive,
            dynamic: parts.dynamic.primitive,
            offset: parts.offset,
            shape: parts.shape,
        };
        // A constant of the graph: NF4 bases are frozen.
        <Self as burn::tensor::backend::AutodiffBackend>::from_inner(B::fast_nf4_dequantize(inner))
    }

    fn fast_swiglu_lora_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let prepared = SwigluLoraLinearBackward
            .prepare::<C>([
                gate.node.clone(),
                up.node.clone(),
                weight.node.clone(),
                a.node.clone(),
                b.node.clone(),
            ])
            .compute_bound()
            .stateful();
        // The product lives only until the projection has read it.
        let h = B::fast_swiglu(gate.primitive.clone(), up.primitive.clone());
        let y = B::fast_lora_linear(
            h,
            weight.primitive.clone(),
            a.primitive.clone(),
            b.primitive.clone(),
            scale,
        );
        match prepared {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    gate.primitive,
                    up.primitive,
                    weight.primitive,
                    a.primitive,
                    b.primitive,
                    scale,
                ),
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_swiglu_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let inputs_need_grad = !gate.node.requirement.is_none() || !up.node.requirement.is_none();
        let prepared = SwigluLinearBackward
            .prepare::<C>([gate.node.clone(), up.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful();
        let h = B::fast_swiglu(gate.primitive.clone(), up.primitive.clone());
        let y = B::fast_gemm_2d(h, weight.primitive.clone(), false, true);
        match prepared {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    gate.primitive,
                    up.primitive,
                    inputs_need_grad.then_some(weight.primitive),
                ),
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let prepared = SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful();
        let out = B::fast_swiglu(gate.primitive.clone(), up.primitive.clone());
        match prepared {
            OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fast_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let prepared = RmsNormBackward
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful();
        let (y, inv_rms) =
            B::fast_rms_norm_forward(x.primitive.clone(), weight.primitive.clone(), eps);
        match prepared {
            OpsKind::Tracked(prep) => {
                let state = (x.primitive, weight.primitive, inv_rms);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        backward: bool,
    ) -> FloatTensor<Self> {
        // cos and sin are functions of positions: constants of the graph.
        let prepared = RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful();
        let y = B::fast_rope(
            x.primitive,
            cos.primitive.clone(),
            sin.primitive.clone(),
            backward,
        );
        match prepared {
            OpsKind::Tracked(prep) => prep.finish((cos.primitive, sin.primitive), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_attention_supported(dtype: DType, head_dim: usize) -> bool {
        B::fused_attention_supported(dtype, head_dim)
    }

    fn fast_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_valid: Option<IntTensor<Self>>,
        spec: FusedAttentionSpec,
    ) -> FloatTensor<Self> {
        let prepared = FusedAttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful();
        let (o, lse) = B::fast_attention_with_lse(
            q.primitive.clone(),
            k.primitive.clone(),
            v.primitive.clone(),
            key_valid.clone(),
            spec,
        );
        match prepared {
            OpsKind::Tracked(prep) => {
                let state = FusedAttentionState {
                    q: q.primitive,
                    k: k.primitive,
                    v: v.primitive,
                    o: o.clone(),
                    lse,
                    key_valid,
                    spec,
                };
                prep.finish(state, o)
            }
            OpsKind::UnTracked(prep) => prep.finish(o),
        }
    }

    fn accelerator_memory_used() -> Option<usize> {
        B::accelerator_memory_used()
    }

    fn accelerator_memory_peak() -> Option<usize> {
        B::accelerator_memory_peak()
    }

    fn fast_copy_to_device(x: FloatTensor<Self>, dst: u64) -> bool {
        B::fast_copy_to_device(x.primitive, dst)
    }

    fn fast_host_f32(x: FloatTensor<Self>) -> Option<Vec<f32>> {
        B::fast_host_f32(x.primitive)
    }

    fn reset_accelerator_memory_peak() {
        B::reset_accelerator_memory_peak()
    }

    fn fast_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let prepared = MatmulBackward
            .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
            .compute_bound()
            .stateful();
        match prepared {
            OpsKind::Tracked(prep) => {
                // Keep each operand only where the other one needs its gradient.
                let lhs_needed = !rhs.node.requirement.is_none();
                let rhs_needed = !lhs.node.requirement.is_none();
                let state = (
                    lhs_needed.then(|| lhs.primitive.clone()),
                    rhs_needed.then(|| rhs.primitive.clone()),
                    lhs.primitive.shape(),
                    rhs.primitive.shape(),
                );
                let out = B::fast_matmul(lhs.primitive, rhs.primitive);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_matmul(lhs.primitive, rhs.primitive)),
        }
    }

    fn fast_gemm_2d(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        let prepared = GemmBackward
            .prepare::<C>([a.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful();
        match prepared {
            OpsKind::Tracked(prep) => {
                let a_needed = !b.node.requirement.is_none();
                let b_needed = !a.node.requirement.is_none();
                let state = (
                    a_needed.then(|| a.primitive.clone()),
                    b_needed.then(|| b.primitive.clone()),
                    transpose_a,
                    transpose_b,
                );
                let out = B::fast_gemm_2d(a.primitive, b.primitive, transpose_a, transpose_b);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_gemm_2d(
                a.primitive,
                b.primitive,
                transpose_a,
                transpose_b,
            )),
        }
    }

    fn fast_masked_softmax(
        scores: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        scale: f64,
        masked_value: f64,
    ) -> FloatTensor<Self> {
        let prepared = MaskedSoftmaxBackward
            .prepare::<C>([scores.node.clone()])
            .compute_bound()
            .stateful();
        let out = B::fast_masked_softmax(scores.primitive, mask.clone(), scale, masked_value);
        match prepared {
            OpsKind::Tracked(prep) => prep.finish((out.clone(), mask, scale), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fast_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        labels: IntTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let want_hidden = !hidden.node.requirement.is_none();
        let want_weight = !weight.node.requirement.is_none();
        let prepared = CrossEntropyBackward
            .prepare::<C>([hidden.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful();
        let tracked = matches!(prepared, OpsKind::Tracked(_));
        let forward = cross_entropy::forward::<B>(
            float(hidden.primitive),
            float(weight.primitive),
            Tensor::from_primitive(labels),
            chunk,
            tracked && want_hidden,
            tracked && want_weight,
        );
        let loss = forward.loss.into_primitive().tensor();
        match prepared {
            OpsKind::Tracked(prep) => {
                let state = CrossEntropyState {
                    grad_hidden: forward.grad_hidden.map(|g| g.into_primitive().tensor()),
                    grad_weight: forward.grad_weight.map(|g| g.into_primitive().tensor()),
                };
                prep.finish(state, loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(loss),
        }
    }

    fn fast_linear_token_logps(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f64,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let prepared = TokenLogpsBackward
            .prepare::<C>([hidden.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful();
        let (logps, lse) = B::fast_token_logps_forward(
            hidden.primitive.clone(),
            weight.primitive.clone(),
            targets.clone(),
            temperature,
            chunk,
        );
        match prepared {
            OpsKind::Tracked(prep) => {
                let state = TokenLogpsState {
                    hidden: hidden.primitive,
                    weight: weight.primitive,
                    targets,
                    lse,
                    temperature,
                    chunk,
                };
                prep.finish(state, logps)
            }
            OpsKind::UnTracked(prep) => prep.finish(logps),
        }
    }
}
