//! `FastOps` for burn-cuda's default backend, `Fusion<CubeBackend<CudaRuntime, ..>>`: each
//! cuBLAS matmul and each fused attention pass is registered in the fusion stream as a custom
//! operation, so the fused kernels around it are flushed before it runs and see its output after.
//!
//! Reference: burn-vision 0.21 `backends/cube/ops.rs` (custom ops under `Fusion`).

use std::marker::PhantomData;

use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType, FloatDType, Shape,
};
use burn_cubecl::{element::BoolElement, CubeBackend, FloatElement, IntElement};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::cuda::CudaRuntime;

use crate::backend::adamw::{self, AdamwStep};
use crate::backend::lora::{LoraGradients, LoraGrads};
use crate::backend::{FastOps, FusedAttentionSpec};

type Cube<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

#[derive(Debug)]
struct MatmulOp<B> {
    desc: CustomOpIr,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for MatmulOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([lhs, rhs], [out]) = self.desc.as_fixed();
        let lhs = handles.get_float_tensor::<B>(lhs);
        let rhs = handles.get_float_tensor::<B>(rhs);
        let result = B::fast_matmul(lhs, rhs);
        handles.register_float_tensor::<B>(&out.id, result);
    }
}

/// The LoRA projection: inputs x, W, A, B; output y.
#[derive(Debug)]
struct LoraForwardOp<B> {
    desc: CustomOpIr,
    scale: f64,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for LoraForwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x, w, a, b], [out]) = self.desc.as_fixed();
        let mut float = |t| handles.get_float_tensor::<B>(t);
        let (x, w, a, b) = (float(x), float(w), float(a), float(b));
        let y = B::fast_lora_linear(x, w, a, b, self.scale);
        handles.register_float_tensor::<B>(&out.id, y);
    }
}

/// The LoRA projection's gradients: inputs x, W, A, B, dy; one output per wanted gradient, in
/// the order x, W, A, B.
#[derive(Debug)]
struct LoraBackwardOp<B> {
    desc: CustomOpIr,
    scale: f64,
    wanted: LoraGrads,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for LoraBackwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let mut float = |i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let (x, w, a, b, dy) = (float(0), float(1), float(2), float(3), float(4));
        let g = B::fast_lora_linear_backward(x, w, a, b, self.scale, dy, self.wanted);
        let produced = [g.x, g.weight, g.a, g.b].into_iter().flatten();
        for (ir, grad) in self.desc.outputs.iter().zip(produced) {
            handles.register_float_tensor::<B>(&ir.id, grad);
        }
    }
}

/// AdamW: inputs weights, grad, exp_avg, exp_avg_sq (and the gradient scale); outputs the new
/// weights, exp_avg, exp_avg_sq (and the low-precision copy).
#[derive(Debug)]
struct AdamwOp<B> {
    desc: CustomOpIr,
    hp: AdamwStep,
    low: Option<FloatDType>,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for AdamwOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let outputs = &self.desc.outputs;
        let mut float = |i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let (w, g, m, v) = (float(0), float(1), float(2), float(3));
        let scale = (inputs.len() > 4).then(|| float(4));
        let (w, m, v, low) = B::fast_adamw(w, g, m, v, scale, self.hp, self.low);
        handles.register_float_tensor::<B>(&outputs[0].id, w);
        handles.register_float_tensor::<B>(&outputs[1].id, m);
        handles.register_float_tensor::<B>(&outputs[2].id, v);
        if let (Some(ir), Some(low)) = (outputs.get(3), low) {
            handles.register_float_tensor::<B>(&ir.id, low);
        }
    }
}

/// Forward attention: inputs q, k, v (and the key mask), outputs o and lse.
#[derive(Debug)]
struct AttentionForwardOp<B> {
    desc: CustomOpIr,
    spec: FusedAttentionSpec,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for AttentionForwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let [o_ir, lse_ir] = self.desc.outputs.as_slice() else {
            unreachable!("the attention forward op has two outputs")
        };
        let q = handles.get_float_tensor::<B>(&inputs[0]);
        let k = handles.get_float_tensor::<B>(&inputs[1]);
        let v = handles.get_float_tensor::<B>(&inputs[2]);
        let mask = inputs.get(3).map(|m| handles.get_int_tensor::<B>(m));
        let (o, lse) = B::fast_attention_with_lse(q, k, v, mask, self.spec);
        handles.register_float_tensor::<B>(&o_ir.id, o);
        handles.register_float_tensor::<B>(&lse_ir.id, lse);
    }
}

/// Backward attention: inputs q, k, v, o, lse, dout (and the key mask), outputs dq, dk, dv.
#[derive(Debug)]
struct AttentionBackwardOp<B> {
    desc: CustomOpIr,
    spec: FusedAttentionSpec,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for AttentionBackwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let [dq_ir, dk_ir, dv_ir] = self.desc.outputs.as_slice() else {
            unreachable!("the attention backward op has three outputs")
        };
        let mut float = |i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let (q, k, v, o, lse, dout) = (float(0), float(1), float(2), float(3), float(4), float(5));
        let mask = inputs.get(6).map(|m| handles.get_int_tensor::<B>(m));
        let (dq, dk, dv) = B::fast_attention_backward(q, k, v, o, lse, dout, mask, self.spec);
        handles.register_float_tensor::<B>(&dq_ir.id, dq);
        handles.register_float_tensor::<B>(&dk_ir.id, dk);
        handles.register_float_tensor::<B>(&dv_ir.id, dv);
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FastOps for Fusion<Cube<F, I, BT>> {
    fn fused_attention_supported(dtype: DType, head_dim: usize) -> bool {
        Cube::<F, I, BT>::fused_attention_supported(dtype, head_dim)
    }

    fn fast_attention_with_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_valid: Option<IntTensor<Self>>,
        spec: FusedAttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let client = q.client.clone();
        let (qs, ks) = (q.shape.clone(), k.shape.clone());
        let o_shape = Shape::new([qs[0], qs[2], qs[1], qs[3]]);
        let lse_shape = Shape::new([qs[0], qs[1], qs[2]]);
        debug_assert_eq!(ks[0], qs[0]);
        let dtype = q.dtype;
        let mut inputs = vec![q, k, v];
        let mask = key_valid;
        let streams = OperationStreams::with_inputs(inputs.iter().chain(mask.iter()));
        let mut irs: Vec<TensorIr> = inputs.drain(..).map(|t| t.into_ir()).collect();
        irs.extend(mask.map(|m| m.into_ir()));
        let o = TensorIr::uninit(client.create_empty_handle(), o_shape, dtype);
        let lse = TensorIr::uninit(client.create_empty_handle(), lse_shape, DType::F32);
        let desc = CustomOpIr::new("runner_flash_attention_fwd", &irs, &[o, lse]);
        let mut out = client.register(
            streams,
            OperationIr::Custom(desc.clone()),
            AttentionForwardOp::<Cube<F, I, BT>> {
                desc,
                spec,
                _backend: PhantomData,
            },
        );
        let lse = out.pop().expect("two outputs");
        let o = out.pop().expect("two outputs");
        (o, lse)
    }

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
        let client = q.client.clone();
        let (q_shape, k_shape) = (q.shape.clone(), k.shape.clone());
        let dtype = q.dtype;
        let inputs = vec![q, k, v, o, lse, dout];
        let mask = key_valid;
        let streams = OperationStreams::with_inputs(inputs.iter().chain(mask.iter()));
        let mut irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        irs.extend(mask.map(|m| m.into_ir()));
        let outs = [
            TensorIr::uninit(client.create_empty_handle(), q_shape, dtype),
            TensorIr::uninit(client.create_empty_handle(), k_shape.clone(), dtype),
            TensorIr::uninit(client.create_empty_handle(), k_shape, dtype),
        ];
        let desc = CustomOpIr::new("runner_flash_attention_bwd", &irs, &outs);
        let mut out = client.register(
            streams,
            OperationIr::Custom(desc.clone()),
            AttentionBackwardOp::<Cube<F, I, BT>> {
                desc,
                spec,
                _backend: PhantomData,
            },
        );
        let dv = out.pop().expect("three outputs");
        let dk = out.pop().expect("three outputs");
        let dq = out.pop().expect("three outputs");
        (dq, dk, dv)
    }

    fn accelerator_memory_used() -> Option<usize> {
        super::device_memory_used(0).ok()
    }

    fn fast_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let client = x.client.clone();
        let shape = Shape::new([x.shape[0], weight.shape[0]]);
        let dtype = x.dtype;
        let inputs = [x, weight, a, b];
        let streams = OperationStreams::with_inputs(inputs.iter());
        let irs = inputs.map(|t| t.into_ir());
        let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
        let desc = CustomOpIr::new("runner_lora_linear", &irs, &[out]);
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                LoraForwardOp::<Cube<F, I, BT>> {
                    desc,
                    scale,
                    _backend: PhantomData,
                },
            )
            .output()
    }

    fn fast_lora_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
        dy: FloatTensor<Self>,
        wanted: LoraGrads,
    ) -> LoraGradients<Self> {
        let client = x.client.clone();
        let shapes = [&x, &weight, &a, &b].map(|t| t.shape.clone());
        let dtype = x.dtype;
        let inputs = [x, weight, a, b, dy];
        let streams = OperationStreams::with_inputs(inputs.iter());
        let irs = inputs.map(|t| t.into_ir());
        let flags = [wanted.x, wanted.weight, wanted.a, wanted.b];
        let outs: Vec<TensorIr> = shapes
            .iter()
            .zip(flags)
            .filter(|(_, want)| *want)
            .map(|(shape, _)| TensorIr::uninit(client.create_empty_handle(), shape.clone(), dtype))
            .collect();
        let desc = CustomOpIr::new("runner_lora_linear_backward", &irs, &outs);
        let mut out = client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                LoraBackwardOp::<Cube<F, I, BT>> {
                    desc,
                    scale,
                    wanted,
                    _backend: PhantomData,
                },
            )
            .into_iter();
        let mut take = |want: bool| want.then(|| out.next().expect("an output per wanted grad"));
        LoraGradients {
            x: take(wanted.x),
            weight: take(wanted.weight),
            a: take(wanted.a),
            b: take(wanted.b),
        }
    }

    fn fast_adamw(
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        grad_scale: Option<FloatTensor<Self>>,
        hp: AdamwStep,
        low: Option<FloatDType>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    ) {
        let fits = super::optim::supported(
            weights.dtype,
            [exp_avg.dtype, exp_avg_sq.dtype],
            grad.dtype,
            grad_scale.as_ref().map(|s| s.dtype),
            low,
        );
        if !fits {
            return adamw::composed_primitive::<Self>(
                weights, grad, exp_avg, exp_avg_sq, grad_scale, hp, low,
            );
        }
        let client = weights.client.clone();
        let shape = weights.shape.clone();
        let inputs: Vec<FloatTensor<Self>> = [weights, grad, exp_avg, exp_avg_sq]
            .into_iter()
            .chain(grad_scale)
            .collect();
        let streams = OperationStreams::with_inputs(inputs.iter());
        let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let mut outs: Vec<TensorIr> = (0..3)
            .map(|_| TensorIr::uninit(client.create_empty_handle(), shape.clone(), DType::F32))
            .collect();
        outs.extend(
            low.map(|d| TensorIr::uninit(client.create_empty_handle(), shape.clone(), d.into())),
        );
        let desc = CustomOpIr::new("runner_adamw", &irs, &outs);
        let mut out = client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                AdamwOp::<Cube<F, I, BT>> {
                    desc,
                    hp,
                    low,
                    _backend: PhantomData,
                },
            )
            .into_iter();
        let mut next = || out.next().expect("an output per description");
        let (w, m, v) = (next(), next(), next());
        let low = low.map(|_| next());
        (w, m, v, low)
    }

    fn fast_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let (ls, rs) = (lhs.shape.clone(), rhs.shape.clone());
        let applies = ls.num_dims() == 3
            && rs.num_dims() == 3
            && ls[2] == rs[1]
            && lhs.dtype == rhs.dtype
            && (ls[0] == rs[0] || ls[0] == 1 || rs[0] == 1)
            && super::worth_cublas(ls[0].max(rs[0]), ls[1], ls[2], rs[2]);
        if !applies {
            return <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_matmul(lhs, rhs);
        }
        let client = lhs.client.clone();
        let out_shape = Shape::new([ls[0].max(rs[0]), ls[1], rs[2]]);
        let streams = OperationStreams::with_inputs([&lhs, &rhs]);
        let out = TensorIr::uninit(client.create_empty_handle(), out_shape, lhs.dtype);
        let desc = CustomOpIr::new(
            "runner_cublas_matmul",
            &[lhs.into_ir(), rhs.into_ir()],
            &[out],
        );
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                MatmulOp::<Cube<F, I, BT>> {
                    desc,
                    _backend: PhantomData,
                },
            )
            .output()
    }
}
