//! `FastOps` for burn-cuda's default backend, `Fusion<CubeBackend<CudaRuntime, ..>>`: each
//! cuBLAS matmul is registered in the fusion stream as a custom operation, so the fused
//! kernels around it are flushed before it runs and see its output after.
//!
//! Reference: burn-vision 0.21 `backends/cube/ops.rs` (custom ops under `Fusion`).

use std::marker::PhantomData;

use burn::tensor::{ops::FloatTensor, Shape};
use burn_cubecl::{element::BoolElement, CubeBackend, FloatElement, IntElement};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::cuda::CudaRuntime;

use crate::backend::FastOps;

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

impl<F: FloatElement, I: IntElement, BT: BoolElement> FastOps for Fusion<Cube<F, I, BT>> {
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
