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

/// NF4 dequantization: inputs the packed words and absmax codes (ints), then the scales, code
/// and dynamic tables; output the dense weight.
#[derive(Debug)]
struct Nf4DequantizeOp<B> {
    desc: CustomOpIr,
    offset: f64,
    shape: [usize; 2],
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for Nf4DequantizeOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([packed, codes, scales, code, dynamic], [out]) = self.desc.as_fixed();
        let parts = crate::backend::nf4::Nf4Parts::<B> {
            packed: handles.get_int_tensor::<B>(packed),
            absmax_codes: handles.get_int_tensor::<B>(codes),
            absmax_scales: handles.get_float_tensor::<B>(scales),
            code: handles.get_float_tensor::<B>(code),
            dynamic: handles.get_float_tensor::<B>(dynamic),
            offset: self.offset,
            shape: self.shape,
        };
        handles.register_float_tensor::<B>(&out.id, B::fast_nf4_dequantize(parts));
    }
}

/// AdamW over many parameters: inputs weights, grad, exp_avg, exp_avg_sq of each (then the
/// gradient scale, if any); outputs the new weights, exp_avg, exp_avg_sq of each, then the
/// low-precision copies of those that ask for one.
#[derive(Debug)]
struct AdamwManyOp<B> {
    desc: CustomOpIr,
    steps: Vec<(AdamwStep, Option<FloatDType>)>,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for AdamwManyOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let outputs = &self.desc.outputs;
        let mut float = |i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let params: Vec<_> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, &(hp, low))| adamw::AdamwTensors {
                weights: float(4 * i),
                grad: float(4 * i + 1),
                exp_avg: float(4 * i + 2),
                exp_avg_sq: float(4 * i + 3),
                hp,
                low,
            })
            .collect();
        let scale = (inputs.len() > 4 * self.steps.len()).then(|| float(4 * self.steps.len()));
        let updated = B::fast_adamw_many(params, scale);
        let mut lows = outputs[3 * self.steps.len()..].iter();
        for (i, u) in updated.into_iter().enumerate() {
            handles.register_float_tensor::<B>(&outputs[3 * i].id, u.weights);
            handles.register_float_tensor::<B>(&outputs[3 * i + 1].id, u.exp_avg);
            handles.register_float_tensor::<B>(&outputs[3 * i + 2].id, u.exp_avg_sq);
            if let Some(low) = u.low {
                let ir = lows.next().expect("an output per low copy");
                handles.register_float_tensor::<B>(&ir.id, low);
            }
        }
    }
}

/// Cross-entropy rows: inputs logits, labels, inv_count; outputs the row losses and, when
/// asked, the logits' gradient.
#[derive(Debug)]
struct CrossEntropyRowsOp<B> {
    desc: CustomOpIr,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for CrossEntropyRowsOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let outputs = &self.desc.outputs;
        let logits = handles.get_float_tensor::<B>(&inputs[0]);
        let labels = handles.get_int_tensor::<B>(&inputs[1]);
        let inv_count = handles.get_float_tensor::<B>(&inputs[2]);
        let (loss, grad) = B::fast_cross_entropy_rows(logits, labels, inv_count, outputs.len() > 1);
        handles.register_float_tensor::<B>(&outputs[0].id, loss);
        if let (Some(ir), Some(grad)) = (outputs.get(1), grad) {
            handles.register_float_tensor::<B>(&ir.id, grad);
        }
    }
}

/// RMSNorm forward: inputs x, weight; outputs y and the inverse RMS.
#[derive(Debug)]
struct RmsForwardOp<B> {
    desc: CustomOpIr,
    eps: f64,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for RmsForwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x, w], [y_ir, inv_ir]) = self.desc.as_fixed();
        let x = handles.get_float_tensor::<B>(x);
        let w = handles.get_float_tensor::<B>(w);
        let (y, inv) = B::fast_rms_norm_forward(x, w, self.eps);
        handles.register_float_tensor::<B>(&y_ir.id, y);
        handles.register_float_tensor::<B>(&inv_ir.id, inv);
    }
}

/// RMSNorm backward: inputs x, weight, inverse RMS, dy; outputs dx and/or dw, in that order.
#[derive(Debug)]
struct RmsBackwardOp<B> {
    desc: CustomOpIr,
    wanted: (bool, bool),
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for RmsBackwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = &self.desc.inputs;
        let mut float = |i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let (x, w, inv, dy) = (float(0), float(1), float(2), float(3));
        let (dx, dw) = B::fast_rms_norm_backward(x, w, inv, dy, self.wanted);
        let mut outputs = self.desc.outputs.iter();
        for grad in [dx, dw].into_iter().flatten() {
            let ir = outputs.next().expect("an output per wanted gradient");
            handles.register_float_tensor::<B>(&ir.id, grad);
        }
    }
}

/// RoPE (or its gradient): inputs x, cos, sin; output y.
#[derive(Debug)]
struct RopeOp<B> {
    desc: CustomOpIr,
    backward: bool,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for RopeOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x, cos, sin], [y]) = self.desc.as_fixed();
        let x = handles.get_float_tensor::<B>(x);
        let cos = handles.get_float_tensor::<B>(cos);
        let sin = handles.get_float_tensor::<B>(sin);
        let out = B::fast_rope(x, cos, sin, self.backward);
        handles.register_float_tensor::<B>(&y.id, out);
    }
}

/// The sum of squares of all inputs: one `[1]` f32 output.
#[derive(Debug)]
struct SumSquaresOp<B> {
    desc: CustomOpIr,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + FastOps> Operation<B::FusionRuntime> for SumSquaresOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let tensors: Vec<_> = self
            .desc
            .inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<B>(ir))
            .collect();
        let device = B::float_device(&tensors[0]);
        let sum = B::fast_sum_squares(tensors, &device);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, sum);
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

    fn fast_offload(x: FloatTensor<Self>) -> crate::backend::offload::Offloaded<Self> {
        let client = x.client.clone();
        let cube = client.resolve_tensor_float::<Cube<F, I, BT>>(x);
        Cube::<F, I, BT>::fast_offload(cube).for_backend()
    }

    fn fast_copy_to_device(x: FloatTensor<Self>, dst: u64) -> bool {
        let client = x.client.clone();
        let cube = client.resolve_tensor_float::<Cube<F, I, BT>>(x);
        Cube::<F, I, BT>::fast_copy_to_device(cube, dst)
    }

    fn accelerator_memory_peak() -> Option<usize> {
        Some(cubecl::cuda::peak_bytes_in_use() as usize)
    }

    fn reset_accelerator_memory_peak() {
        cubecl::cuda::reset_peak_bytes_in_use();
    }

    fn fast_nf4_dequantize(parts: crate::backend::nf4::Nf4Parts<Self>) -> FloatTensor<Self> {
        let client = parts.code.client.clone();
        let dtype = parts.code.dtype;
        let inputs = [
            parts.packed,
            parts.absmax_codes,
            parts.absmax_scales,
            parts.code,
            parts.dynamic,
        ];
        let streams = OperationStreams::with_inputs(inputs.iter());
        let irs = inputs.map(|t| t.into_ir());
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new(parts.shape), dtype);
        let desc = CustomOpIr::new("runner_nf4_dequantize", &irs, &[out]);
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                Nf4DequantizeOp::<Cube<F, I, BT>> {
                    desc,
                    offset: parts.offset,
                    shape: parts.shape,
                    _backend: PhantomData,
                },
            )
            .output()
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

    fn fast_adamw_many(
        params: Vec<adamw::AdamwTensors<FloatTensor<Self>>>,
        grad_scale: Option<FloatTensor<Self>>,
    ) -> Vec<adamw::AdamwUpdated<FloatTensor<Self>>> {
        let Some(client) = params.first().map(|p| p.weights.client.clone()) else {
            return Vec::new();
        };
        // One custom operation for all: the inner backend groups them into kernel launches.
        // Each output keeps its input's type (the kernel's and the composed update's rule).
        let mut steps = Vec::with_capacity(params.len());
        let mut inputs: Vec<FloatTensor<Self>> = Vec::with_capacity(4 * params.len() + 1);
        let mut outs: Vec<TensorIr> = Vec::with_capacity(4 * params.len());
        let mut lows = Vec::new();
        for p in params {
            let shape = p.weights.shape.clone();
            for t in [&p.weights, &p.exp_avg, &p.exp_avg_sq] {
                outs.push(TensorIr::uninit(
                    client.create_empty_handle(),
                    shape.clone(),
                    t.dtype,
                ));
            }
            lows.extend(
                p.low.map(|d| {
                    TensorIr::uninit(client.create_empty_handle(), shape.clone(), d.into())
                }),
            );
            steps.push((p.hp, p.low));
            inputs.extend([p.weights, p.grad, p.exp_avg, p.exp_avg_sq]);
        }
        let count = steps.len();
        let wanted_low: Vec<bool> = steps.iter().map(|(_, low)| low.is_some()).collect();
        outs.extend(lows);
        inputs.extend(grad_scale);
        let streams = OperationStreams::with_inputs(inputs.iter());
        let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("runner_adamw_many", &irs, &outs);
        let mut produced: Vec<FloatTensor<Self>> = client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                AdamwManyOp::<Cube<F, I, BT>> {
                    desc,
                    steps,
                    _backend: PhantomData,
                },
            )
            .into_iter()
            .collect();
        // The main outputs come first, three a parameter, then the low copies in order.
        let mut lows = produced.split_off(3 * count).into_iter();
        let mut main = produced.into_iter();
        let mut updated = Vec::with_capacity(count);
        for wants_low in wanted_low {
            let mut next = || main.next().expect("three outputs a parameter");
            let (weights, exp_avg, exp_avg_sq) = (next(), next(), next());
            updated.push(adamw::AdamwUpdated {
                weights,
                exp_avg,
                exp_avg_sq,
                low: wants_low.then(|| lows.next().expect("an output per low copy")),
            });
        }
        updated
    }

    fn fast_rms_norm_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let client = x.client.clone();
        let shape = x.shape.clone();
        let rows = shape.as_slice().first().copied().unwrap_or(0);
        // The inner backend keeps the inverse RMS of bf16 and f32 inputs in f32, kernel or not.
        let inv_dtype = if matches!(x.dtype, DType::BF16 | DType::F32) {
            DType::F32
        } else {
            x.dtype
        };
        let outs = [
            TensorIr::uninit(client.create_empty_handle(), shape, x.dtype),
            TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([rows, 1]),
                inv_dtype,
            ),
        ];
        let streams = OperationStreams::with_inputs([&x, &weight]);
        let desc = CustomOpIr::new(
            "runner_rms_forward",
            &[x.into_ir(), weight.into_ir()],
            &outs,
        );
        let mut out = client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                RmsForwardOp::<Cube<F, I, BT>> {
                    desc,
                    eps,
                    _backend: PhantomData,
                },
            )
            .into_iter();
        let y = out.next().expect("y");
        (y, out.next().expect("the inverse RMS"))
    }

    fn fast_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        inv_rms: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        wanted: (bool, bool),
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let client = x.client.clone();
        let mut outs = Vec::new();
        if wanted.0 {
            outs.push(TensorIr::uninit(
                client.create_empty_handle(),
                x.shape.clone(),
                x.dtype,
            ));
        }
        if wanted.1 {
            outs.push(TensorIr::uninit(
                client.create_empty_handle(),
                weight.shape.clone(),
                weight.dtype,
            ));
        }
        if outs.is_empty() {
            return (None, None);
        }
        let streams = OperationStreams::with_inputs([&x, &weight, &inv_rms, &dy]);
        let irs = [
            x.into_ir(),
            weight.into_ir(),
            inv_rms.into_ir(),
            dy.into_ir(),
        ];
        let desc = CustomOpIr::new("runner_rms_backward", &irs, &outs);
        let mut out = client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                RmsBackwardOp::<Cube<F, I, BT>> {
                    desc,
                    wanted,
                    _backend: PhantomData,
                },
            )
            .into_iter();
        let dx = wanted.0.then(|| out.next().expect("dx"));
        let dw = wanted.1.then(|| out.next().expect("dw"));
        (dx, dw)
    }

    fn fast_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        backward: bool,
    ) -> FloatTensor<Self> {
        let client = x.client.clone();
        let out = TensorIr::uninit(client.create_empty_handle(), x.shape.clone(), x.dtype);
        let streams = OperationStreams::with_inputs([&x, &cos, &sin]);
        let desc = CustomOpIr::new(
            "runner_rope",
            &[x.into_ir(), cos.into_ir(), sin.into_ir()],
            &[out],
        );
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                RopeOp::<Cube<F, I, BT>> {
                    desc,
                    backward,
                    _backend: PhantomData,
                },
            )
            .output()
    }

    fn fast_cross_entropy_rows(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        inv_count: FloatTensor<Self>,
        want_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let client = logits.client.clone();
        let shape = logits.shape.clone();
        let rows = shape.as_slice().first().copied().unwrap_or(0);
        let mut outs = vec![TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([rows]),
            DType::F32,
        )];
        if want_grad {
            outs.push(TensorIr::uninit(
                client.create_empty_handle(),
                shape,
                logits.dtype,
            ));
        }
        let streams = OperationStreams::with_inputs([&logits, &labels, &inv_count]);
        let desc = CustomOpIr::new(
            "runner_cross_entropy_rows",
            &[logits.into_ir(), labels.into_ir(), inv_count.into_ir()],
            &outs,
        );
        let mut out = client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                CrossEntropyRowsOp::<Cube<F, I, BT>> {
                    desc,
                    _backend: PhantomData,
                },
            )
            .into_iter();
        let loss = out.next().expect("the row losses");
        (loss, out.next())
    }

    fn fast_sum_squares(
        tensors: Vec<FloatTensor<Self>>,
        device: &Self::Device,
    ) -> FloatTensor<Self> {
        let Some(client) = tensors.first().map(|t| t.client.clone()) else {
            return adamw::composed_sum_squares::<Self>(tensors, device);
        };
        let streams = OperationStreams::with_inputs(tensors.iter());
        let irs: Vec<TensorIr> = tensors.into_iter().map(|t| t.into_ir()).collect();
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([1]), DType::F32);
        let desc = CustomOpIr::new("runner_sum_squares", &irs, &[out]);
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                SumSquaresOp::<Cube<F, I, BT>> {
                    desc,
                    _backend: PhantomData,
                },
            )
            .output()
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
