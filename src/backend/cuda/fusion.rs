//! `FastOps` for burn-cuda's default backend, `Fusion<CubeBackend<CudaRuntime, ..>>`: each
//! cuBLAS matmul and each fused attention pass is registered in the fusion stream as a custom
//! operation, so the fused kernels around it are flushed before it runs and see its output after.
//!
//! Reference: burn-vision 0.21 `backends/cube/ops.rs` (custom ops under `Fusion`).

use std::marker::PhantomData;

use burn::tensor::{
    ops::{FloatTensor, IntTensor},
    DType, Shape,
};
use burn_cubecl::{element::BoolElement, CubeBackend, FloatElement, IntElement};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::cuda::CudaRuntime;

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
