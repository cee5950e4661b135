//! AdamW with torch semantics, global-norm gradient clipping, and state keyed by parameter path.
//!
//! References: torch `optim/adamw.py` / `adam.py` `_single_tensor_adam` (decoupled decay
//! `p *= 1 - lr * wd`, then `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`),
//! `nn/utils/clip_grad.py` `clip_grad_norm_` (`coef = min(1, max_norm / (norm + 1e-6))`), and
//! transformers `Trainer.get_decay_parameter_names` (no decay on biases and norm weights).
//! burn-optim's `AdamW` has the same update but one weight decay for every parameter and
//! per-tensor clipping, and its state is keyed by `ParamId`, which changes between processes.

use std::collections::{BTreeMap, HashMap};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use crate::backend::adamw::{AdamwStep, AdamwTensors};
use crate::model::hf::HostTensor;

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Moments of one parameter, in its shape (flat when loaded from a checkpoint: the update
/// only needs equal element counts). Primitives, so that a step adds no reshape per tensor.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: FloatTensor<B>,
    pub exp_avg_sq: FloatTensor<B>,
    /// Updates applied to this parameter (torch's `state["step"]`).
    pub step: u64,
    /// The master copy of a parameter held in a lower precision than [`AdamW::master_dtype`]
    /// (bf16 training): updates accumulate here, the parameter is its rounding.
    pub master: Option<FloatTensor<B>>,
}

/// `t` as a flat tensor (for reading values: checkpoints, tests).
pub fn flat<B: Backend>(t: &FloatTensor<B>) -> Tensor<B, 1> {
    let n = t.shape().num_elements();
    Tensor::from_primitive(TensorPrimitive::Float(B::float_reshape(
        t.clone(),
        Shape::new([n]),
    )))
}

/// The optimizer: hyperparameters and per-path moments on the inner (non-autodiff) backend.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub params: AdamWParams,
    pub state: BTreeMap<String, Moments<B>>,
    /// Precision of the update: a parameter held in another float type (bf16 weights under an
    /// f32 optimizer) gets a master copy, moments and update in this type, so steps smaller
    /// than its own rounding are not lost. Default f32.
    pub master_dtype: FloatDType,
}

/// transformers' rule: biases and norm weights get no weight decay.
pub fn decays(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let norm_segment = lower
        .split('.')
        .any(|s| s == "norm" || s.ends_with("_norm"));
    !(lower.contains("bias")
        || lower.contains("layernorm")
        || lower.contains("rmsnorm")
        || norm_segment)
}

struct PathStack(Vec<String>);

impl PathStack {
    fn push(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn pop(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0.join(".")
    }
}

struct Grads<'a, B: Backend> {
    grads: &'a GradientsParams,
    found: Vec<FloatTensor<B>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Grads<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
            self.found.push(g.into_primitive().tensor());
        }
    }
}

/// The global L2 norm of all gradients of `module`'s parameters, as a `[1]` f32 device tensor
/// (no host read; one pass over all gradients on the GPU).
pub fn global_grad_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &GradientsParams,
    device: &AB::Device,
) -> Tensor<AB::InnerBackend, 1> {
    let mut v = Grads::<AB::InnerBackend> {
        grads,
        found: Vec::new(),
    };
    module.visit(&mut v);
    crate::backend::sum_squares(v.found, device).sqrt()
}

/// A parameter with a gradient, found by [`Collect`]: its value and gradient, in its shape.
struct Found<B: Backend> {
    id: ParamId,
    path: String,
    value: FloatTensor<B>,
    grad: FloatTensor<B>,
}

/// First pass of a step: every parameter that has a gradient (taken out of `grads`), so that
/// all of them update together. Until the second pass the module still holds the old values,
/// so an f32 parameter without a master copy is updated out of place (one transient copy of
/// such weights in full fine-tuning; moments and masters are updated in place).
struct Collect<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    stack: PathStack,
    found: Vec<Found<B>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_, AB::InnerBackend> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(param.id) else {
            return;
        };
        self.found.push(Found {
            id: param.id,
            path: self.stack.path(),
            value: param.val().inner().into_primitive().tensor(),
            grad: grad.into_primitive().tensor(),
        });
    }
}

/// Second pass: each updated parameter takes its new value (a fresh leaf of the graph).
struct Replace<B: Backend> {
    values: HashMap<ParamId, FloatTensor<B>>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Replace<AB::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(value) = self.values.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        drop(tensor);
        let value = Tensor::<AB::InnerBackend, D>::from_primitive(TensorPrimitive::Float(value));
        let new = Tensor::<AB, D>::from_inner(value).require_grad();
        Param::from_mapped_value(id, new, mapper)
    }
}

impl<B: Backend> AdamW<B> {
    pub fn new(params: AdamWParams) -> Self {
        Self {
            params,
            state: BTreeMap::new(),
            master_dtype: FloatDType::F32,
        }
    }

    /// Sets the precision of the update (see [`AdamW::master_dtype`]).
    pub fn with_master_dtype(mut self, dtype: FloatDType) -> Self {
        self.master_dtype = dtype;
        self
    }

    /// One optimizer step on every parameter of `module` that has a gradient in `grads`
    /// (consumed). `grad_scale` (`[1]`) multiplies every gradient first (clipping).
    pub fn step<AB, M>(
        &mut self,
        module: M,
        grads: &mut GradientsParams,
        lr: f64,
        grad_scale: Option<Tensor<B, 1>>,
    ) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut collect = Collect::<B> {
            grads,
            stack: PathStack(Vec::new()),
            found: Vec::new(),
        };
        module.visit(&mut collect);
        let hp = self.params;
        let master_dtype = self.master_dtype;
        let mut updates = Vec::with_capacity(collect.found.len());
        let mut keys = Vec::with_capacity(collect.found.len());
        for Found {
            id,
            path,
            value,
            grad,
        } in collect.found
        {
            let param_dtype = value.dtype();
            let mixed = param_dtype != DType::from(master_dtype);
            let zeros = |like: &FloatTensor<B>| {
                B::float_zeros(like.shape(), &B::float_device(like), master_dtype)
            };
            let (m, v, step, master) = match self.state.remove(&path) {
                Some(s) => (Some(s.exp_avg), Some(s.exp_avg_sq), s.step, s.master),
                None => (None, None, 0, None),
            };
            // Under mixed precision the update runs in the master type.
            let weights = match master {
                Some(master) if mixed => master,
                _ if mixed => B::float_cast(value, master_dtype),
                _ => value,
            };
            let step = step + 1;
            updates.push(AdamwTensors {
                exp_avg: m.unwrap_or_else(|| zeros(&weights)),
                exp_avg_sq: v.unwrap_or_else(|| zeros(&weights)),
                weights,
                grad,
                hp: AdamwStep {
                    lr,
                    beta1: hp.beta1,
                    beta2: hp.beta2,
                    eps: hp.eps,
                    weight_decay: if decays(&path) { hp.weight_decay } else { 0.0 },
                    step,
                },
                low: mixed.then(|| FloatDType::from(param_dtype)),
            });
            keys.push((id, path, step));
        }
        // Gradients are scaled after their cast to the master type: cast the scale once here.
        let grad_scale = grad_scale.map(|s| s.cast(master_dtype).into_primitive().tensor());
        let outputs = crate::backend::adamw_update_many::<B>(updates, grad_scale);
        let mut values = HashMap::with_capacity(keys.len());
        for ((id, path, step), out) in keys.into_iter().zip(outputs) {
            let (value, master) = match out.low {
                Some(low) => (low, Some(out.weights)),
                None => (out.weights, None),
            };
            self.state.insert(
                path,
                Moments {
                    exp_avg: out.exp_avg,
                    exp_avg_sq: out.exp_avg_sq,
                    step,
                    master,
                },
            );
            values.insert(id, value);
        }
        module.map(&mut Replace { values })
    }

    /// The state as host tensors (`exp_avg.<path>`, `exp_avg_sq.<path>`, and `master.<path>`
    /// for parameters held in lower precision) and step counts.
    pub fn to_host(&self) -> (BTreeMap<String, HostTensor>, BTreeMap<String, u64>) {
        let mut tensors = BTreeMap::new();
        let mut steps = BTreeMap::new();
        let host = |t: &FloatTensor<B>| {
            let d = flat::<B>(t).into_data();
            HostTensor::new(
                d.shape.to_vec(),
                d.convert::<f32>().into_vec::<f32>().unwrap_or_default(),
            )
        };
        for (path, s) in &self.state {
            tensors.insert(format!("exp_avg.{path}"), host(&s.exp_avg));
            tensors.insert(format!("exp_avg_sq.{path}"), host(&s.exp_avg_sq));
            if let Some(master) = &s.master {
                tensors.insert(format!("master.{path}"), host(master));
            }
            steps.insert(path.clone(), s.step);
        }
        (tensors, steps)
    }

    /// Rebuilds the state saved by [`Self::to_host`]; the error names the first missing tensor.
    pub fn load_host(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
        steps: &BTreeMap<String, u64>,
        device: &B::Device,
    ) -> Result<(), String> {
        self.state.clear();
        // Moments and masters live in the master type, whatever the backend's default.
        let dtype = DType::from(self.master_dtype);
        let dev = |name: &str| -> Result<FloatTensor<B>, String> {
            let t = tensors.get(name).ok_or_else(|| name.to_string())?;
            let flat = Tensor::<B, 1>::from_data(
                TensorData::new(t.data.clone(), [t.data.len()]),
                (device, dtype),
            );
            Ok(flat.into_primitive().tensor())
        };
        for (path, &step) in steps {
            let exp_avg = dev(&format!("exp_avg.{path}"))?;
            let exp_avg_sq = dev(&format!("exp_avg_sq.{path}"))?;
            let master_name = format!("master.{path}");
            let master = if tensors.contains_key(&master_name) {
                Some(dev(&master_name)?)
            } else {
                None
            };
            self.state.insert(
                path.clone(),
                Moments {
                    exp_avg,
                    exp_avg_sq,
                    step,
                    master,
                },
            );
        }
        Ok(())
    }
}

/// torch's clipping factor `min(1, max_norm / (norm + 1e-6))` as a device tensor.
pub fn clip_scale<B: Backend>(norm: Tensor<B, 1>, max_norm: f64) -> Tensor<B, 1> {
    norm.add_scalar(1e-6)
        .recip()
        .mul_scalar(max_norm)
        .clamp_max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;

    use crate::testing::AD;
    use crate::testing::TB;

    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        weight: Param<Tensor<B, 2>>,
        bias: Param<Tensor<B, 1>>,
    }

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    /// Expected values printed by torch 2.11 (`torch.optim.AdamW` with param groups
    /// `weight_decay` 0.1 for the weight and 0 for the bias, lr 0.1, betas (0.9, 0.95),
    /// eps 1e-6, `clip_grad_norm_(.., 1.5)` before each of 3 steps): `scripts/adamw_reference.py`.
    #[test]
    fn three_clipped_steps_match_torch_adamw() {
        let dev = Default::default();
        let w0: Vec<f32> = (0..6).map(|i| (i as f32).cos()).collect();
        let b0: Vec<f32> = (0..3).map(|i| (i as f32 + 1.0).cos()).collect();
        let mut toy = Toy::<AD> {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w0, [2, 3]), &dev)),
            bias: Param::from_tensor(Tensor::from_data(TensorData::new(b0, [3]), &dev)),
        };
        let mut opt = AdamW::<TB>::new(AdamWParams {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.1,
        });
        let mut norms = Vec::new();
        for k in 0..3usize {
            let gw: Vec<f32> = (0..6)
                .map(|i| ((i * (k + 1)) as f32).sin() * (k + 1) as f32)
                .collect();
            let gb: Vec<f32> = (0..3).map(|i| ((i + k) as f32).sin() * 0.5).collect();
            let mut grads = GradientsParams::new();
            grads.register::<TB, 2>(
                toy.weight.id,
                Tensor::from_data(TensorData::new(gw, [2, 3]), &dev),
            );
            grads.register::<TB, 1>(
                toy.bias.id,
                Tensor::from_data(TensorData::new(gb, [3]), &dev),
            );
            let norm = global_grad_norm::<AD, Toy<AD>>(&toy, &grads, &dev);
            norms.push(values(norm.clone())[0]);
            toy = opt.step::<AD, _>(toy, &mut grads, 0.1, Some(clip_scale(norm, 1.5)));
        }
        let close =
            |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(a, b)| (a - b).abs() < 2e-6);
        assert!(
            close(&norms, &[1.852_247_2, 3.376_157, 3.026_946]),
            "{norms:?}"
        );
        let w = values(toy.weight.val());
        let want_w = [
            0.970_299_07,
            0.238_217_38,
            -0.475_773_66,
            -1.064_687_6,
            -0.534_670_53,
            0.473_685_56,
        ];
        assert!(close(&w, &want_w), "{w:?}");
        let b = values(toy.bias.val());
        assert!(
            close(&b, &[0.382_161_92, -0.693_034_6, -1.185_747_4]),
            "{b:?}"
        );
        assert_eq!(opt.state["weight"].step, 3);
    }

    /// `steps` steps with a constant gradient on a toy weight; its values after each step.
    fn constant_gradient_steps(opt: &mut AdamW<TB>, lr: f64, steps: usize) -> Vec<Vec<f32>> {
        let dev = Default::default();
        let mut toy = Toy::<AD> {
            weight: Param::from_tensor(Tensor::ones([1, 2], &dev)),
            bias: Param::from_tensor(Tensor::zeros([1], &dev)),
        };
        let mut seen = Vec::new();
        for _ in 0..steps {
            let mut grads = GradientsParams::new();
            grads.register::<TB, 2>(toy.weight.id, Tensor::ones([1, 2], &dev));
            toy = opt.step::<AD, _>(toy, &mut grads, lr, None);
            seen.push(values(toy.weight.val()));
        }
        seen
    }

    /// bf16 training's f32 masters, at one precision up: an f32 weight at 1.0 under an f64
    /// optimizer. Each Adam step moves it by lr (2e-8), under half of f32's spacing below 1.0
    /// (6e-8), so plain f32 never moves while the master copy accumulates the
    /// steps and the weight follows its rounding.
    #[test]
    fn master_copies_keep_steps_smaller_than_the_weights_rounding() {
        let params = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-12,
            weight_decay: 0.0,
        };
        let plain = constant_gradient_steps(&mut AdamW::<TB>::new(params), 2e-8, 10);
        assert!(plain.iter().all(|w| w == &[1.0, 1.0]), "{plain:?}");

        let mut opt = AdamW::<TB>::new(params).with_master_dtype(FloatDType::F64);
        let mixed = constant_gradient_steps(&mut opt, 2e-8, 10);
        let master = opt.state["weight"].master.clone().expect("a master copy");
        assert_eq!(master.dtype(), DType::F64);
        let m = flat::<TB>(&master)
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .unwrap();
        // Adam's first steps with a constant gradient are exactly lr each.
        assert!((m[0] - (1.0 - 10.0 * 2e-8)).abs() < 1e-12, "{m:?}");
        assert_eq!(mixed.last().unwrap()[0], (1.0 - 10.0 * 2e-8) as f32);
        assert!(mixed.last().unwrap()[0] < 1.0);
        // The weight is always the master's rounding, and stays f32.
        assert!(opt.state["weight"].exp_avg.dtype() == DType::F64);

        // The master survives a checkpoint round trip (saved as f32, reloaded as the master type).
        let (tensors, steps) = opt.to_host();
        assert!(tensors.contains_key("master.weight"));
        let mut reloaded = AdamW::<TB>::new(params).with_master_dtype(FloatDType::F64);
        reloaded
            .load_host(&tensors, &steps, &Default::default())
            .unwrap();
        let again = reloaded.state["weight"].master.clone().unwrap();
        assert_eq!(again.dtype(), DType::F64);
    }

    #[test]
    fn decay_rule_matches_transformers_names() {
        assert!(decays("model.layers.0.self_attn.q_proj.lora_a"));
        assert!(decays("model.embed_tokens.weight"));
        assert!(decays("model.layers.0.mlp.down_proj.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
    }
}
