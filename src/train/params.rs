//! Named access to a module's trainable parameters, by the dotted path of its fields
//! (`model.layers.0.self_attn.q_proj.lora_a`), as burn's `ModuleVisitor`/`ModuleMapper`
//! report them through `enter_module`/`exit_module`. Checkpoints and optimizer state are keyed
//! by these paths, which stay the same across processes (burn's `ParamId`s do not).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::model::hf::HostTensor;

/// One trainable parameter: its path, id and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableParam {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
}

#[derive(Default)]
struct Collect {
    stack: Vec<String>,
    found: Vec<TrainableParam>,
    values: Option<BTreeMap<String, HostTensor>>,
    total: usize,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        self.total += shape.iter().product::<usize>();
        if !tensor.is_require_grad() {
            return;
        }
        let path = self.stack.join(".");
        if let Some(values) = &mut self.values {
            values.insert(path.clone(), host(tensor.into_data()));
        }
        self.found.push(TrainableParam {
            path,
            id: param.id,
            shape,
        });
    }
}

fn host(data: TensorData) -> HostTensor {
    let shape = data.shape.to_vec();
    HostTensor::new(
        shape,
        data.convert::<f32>().into_vec::<f32>().unwrap_or_default(),
    )
}

/// The parameters that require gradients, in module order, and the count of all parameter values.
pub fn trainable_params<B: Backend, M: Module<B>>(module: &M) -> (Vec<TrainableParam>, usize) {
    let mut c = Collect::default();
    module.visit(&mut c);
    (c.found, c.total)
}

/// The values of the trainable parameters, by path (a host copy).
pub fn trainable_values<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, HostTensor> {
    let mut c = Collect {
        values: Some(BTreeMap::new()),
        ..Collect::default()
    };
    module.visit(&mut c);
    c.values.unwrap_or_default()
}

struct Assign<'a, B: Backend> {
    stack: Vec<String>,
    values: &'a BTreeMap<String, HostTensor>,
    device: B::Device,
    assigned: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Assign<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.stack.join(".");
        let (id, tensor, mapper) = param.consume();
        let Some(value) = self.values.get(&path) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        if value.shape != tensor.dims().to_vec() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let require_grad = tensor.is_require_grad();
        let mut new = Tensor::<B, D>::from_data(
            TensorData::new(value.data.clone(), value.shape.clone()),
            &self.device,
        );
        if require_grad {
            new = new.require_grad();
        }
        self.assigned.push(path);
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Replaces parameters whose path is in `values` (same shape), keeping ids and gradient flags.
/// Returns the module and the paths assigned.
pub fn assign_values<B: Backend, M: Module<B>>(
    module: M,
    values: &BTreeMap<String, HostTensor>,
    device: &B::Device,
) -> (M, Vec<String>) {
    let mut a = Assign::<B> {
        stack: Vec::new(),
        values,
        device: device.clone(),
        assigned: Vec::new(),
    };
    let module = module.map(&mut a);
    (module, a.assigned)
}
