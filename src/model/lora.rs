//! A linear layer in Hugging Face layout with an optional LoRA adapter.
//!
//! `weight` is `[out, in]` and `bias` `[out]` exactly as in HF safetensors, so base keys load
//! unchanged; `lora_a` `[r, in]` and `lora_b` `[out, r]` follow peft's `lora_A`/`lora_B`
//! layout. Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
//! peft `tuners/lora/layer.py` (`Linear.forward`, kaiming-uniform A, zero B,
//! `scaling = alpha / r`).
//!
//! The base weight may be held in NF4 (QLoRA, [`crate::model::nf4_linear`]), and the adapter may
//! carry DoRA's magnitude vector (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation";
//! peft `tuners/lora/dora.py` `DoraLinearLayer`, `tuners/lora/variants.py` `DoraLinearVariant`).

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use crate::model::nf4::Error as Nf4Error;
use crate::model::nf4_linear::{BaseWeight, Nf4Weight};

/// `y = x W^T + b + scaling * dropout(x) A^T B^T`; with DoRA see [`LoraLinear::forward`].
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `[out, in]`, dense or NF4.
    pub weight: BaseWeight<B>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// `[r, in]`.
    pub lora_a: Option<Param<Tensor<B, 2>>>,
    /// `[out, r]`.
    pub lora_b: Option<Param<Tensor<B, 2>>>,
    /// AdaLoRA's singular values `[r, 1]` (peft `lora_E`): the adapter is `B (A * E)`. `None`
    /// for plain LoRA. With it, `scaling` is peft's `lora_alpha / (ranknum + 1e-5)`.
    pub lora_e: Option<Param<Tensor<B, 2>>>,
    /// `alpha / r` (0 without an adapter).
    pub scaling: f64,
    pub dropout: Dropout,
    /// DoRA's `lora_magnitude_vector` `[out]` (None: plain LoRA).
    pub magnitude: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> LoraLinear<B> {
    /// A plain linear layer from HF-layout tensors (`weight [out, in]`, `bias [out]`).
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::with_base(BaseWeight::Dense(Param::from_tensor(weight)), bias)
    }

    /// A plain linear layer over a given base weight (dense or NF4).
    pub fn with_base(weight: BaseWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight,
            bias: bias.map(Param::from_tensor),
            lora_a: None,
            lora_b: None,
            lora_e: None,
            scaling: 0.0,
            dropout: DropoutConfig::new(0.0).init(),
            magnitude: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Adds a fresh adapter as peft does: A kaiming-uniform (a = sqrt(5), i.e. bound
    /// `1/sqrt(in)`), B zeros, so the layer's output is unchanged until B trains.
    pub fn with_lora(mut self, rank: usize, alpha: f64, dropout: f64) -> Self {
        let device = self.weight.device();
        let (out, inp) = (self.out_features(), self.in_features());
        let bound = 1.0 / (inp as f64).sqrt();
        self.lora_a = Some(Param::from_tensor(Tensor::random(
            [rank, inp],
            Distribution::Uniform(-bound, bound),
            &device,
        )));
        self.lora_b = Some(Param::from_tensor(Tensor::zeros([out, rank], &device)));
        self.scaling = alpha / rank as f64;
        self.dropout = DropoutConfig::new(dropout).init();
        self
    }

    /// Sets adapter tensors loaded from a checkpoint (`a [r, in]`, `b [out, r]`).
    pub fn with_lora_tensors(mut self, a: Tensor<B, 2>, b: Tensor<B, 2>, scaling: f64) -> Self {
        self.lora_a = Some(Param::from_tensor(a));
        self.lora_b = Some(Param::from_tensor(b));
        self.scaling = scaling;
        self
    }

    /// Marks the base weight and bias as frozen (no gradients under autodiff);
    /// adapter tensors stay trainable.
    pub fn freeze_base(mut self) -> Self {
        self.weight = self.weight.set_require_grad(false);
        self.bias = self.bias.map(|b| b.set_require_grad(false));
        self
    }

    /// Replaces a dense base weight by its NF4 quantization (QLoRA's frozen base).
    pub fn quantize_base_nf4(mut self) -> Result<Self, Nf4Error> {
        if let BaseWeight::Dense(w) = &self.weight {
            self.weight = BaseWeight::Nf4(Nf4Weight::quantize(w.val())?);
        }
        Ok(self)
    }

    /// Row norms `||W + scaling B A||` over dim 1 (`[out]`), without gradient (DoRA section 4.3,
    /// peft `DoraLinearLayer.get_weight_norm` on the detached LoRA weight).
    fn dora_weight_norm(&self, w: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
        // Every step of DoRA runs this product: through the backend's GEMM (cuBLAS on CUDA).
        let lora = crate::backend::matmul_2d(b, a)
            .detach()
            .mul_scalar(self.scaling);
        let out = self.out_features();
        w.detach()
            .add(lora)
            .powf_scalar(2.0)
            .sum_dim(1)
            .sqrt()
            .reshape([out])
    }

    /// Adds DoRA's magnitude vector initialised as peft does: `||W + scaling B A||` per output row.
    /// Needs the adapter factors.
    pub fn with_dora(mut self) -> Self {
        if let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) {
            let norm = self.dora_weight_norm(self.weight.val(), a.val(), b.val());
            self.magnitude = Some(Param::from_tensor(norm));
        }
        self
    }

    /// Sets a magnitude vector loaded from a checkpoint (`[out]`).
    pub fn with_magnitude(mut self, magnitude: Tensor<B, 1>) -> Self {
        self.magnitude = Some(Param::from_tensor(magnitude));
        self
    }

    /// The adapter's `A`, times `E` row-wise for AdaLoRA (`A * E`, peft `SVDLinear`).
    fn effective_a(&self) -> Option<Tensor<B, 2>> {
        let a = self.lora_a.as_ref()?.val();
        Some(match &self.lora_e {
            Some(e) => a.mul(e.val()),
            None => a,
        })
    }

    /// Folds the adapter into a dense `weight` and drops it: `W + scaling B A` (AdaLoRA:
    /// `B (A * E)`), with DoRA
    /// `m / ||W + scaling B A|| * (W + scaling B A)` (peft `DoraLinearVariant.merge_safe`).
    /// An NF4 base is dequantized.
    pub fn merged(mut self) -> Self {
        let magnitude = self.magnitude.take();
        if let (Some(a), Some(b)) = (self.effective_a(), self.lora_b.take()) {
            self.lora_a = None;
            self.lora_e = None;
            let w = self.weight.val();
            let delta = b.val().matmul(a.clone()).mul_scalar(self.scaling);
            let mut merged = w.clone().add(delta);
            if let Some(m) = magnitude {
                let norm = self.dora_weight_norm(w, a, b.val());
                let factor = m.val().div(norm).unsqueeze_dim::<2>(1);
                merged = merged.mul(factor);
            }
            self.weight = BaseWeight::Dense(Param::from_tensor(merged));
        }
        self.scaling = 0.0;
        self
    }

    /// # Shapes
    /// - input: `[..., in]` (`D >= 2`)
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let inp = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let x2 = x.reshape([rows, inp]);
        let w = self.weight.val();
        let dropped = self.dropout.prob > 0.0 && B::ad_enabled(&x2.device());
        let mut y = match (&self.magnitude, self.effective_a(), &self.lora_b) {
            (Some(m), Some(_), Some(b)) => {
                let a = self.lora_a.as_ref().expect("DoRA has lora_a").val();
                let base = crate::backend::linear(x2.clone(), w.clone());
                self.dora_delta(base, x2, w, m.val(), a, b.val())
            }
            // No dropout between x and A: the base and the adapter are one operation (one
            // autodiff node, no elementwise passes on CUDA).
            (None, Some(a), Some(b)) if !dropped => {
                crate::backend::lora_linear(x2, w, a, b.val(), self.scaling)
            }
            (None, Some(a), Some(b)) => {
                // Through the backend's products so they reach cuBLAS on CUDA like the base's.
                let low = crate::backend::linear(
                    crate::backend::linear(self.dropout.forward(x2.clone()), a),
                    b.val(),
                );
                crate::backend::linear(x2, w).add(low.mul_scalar(self.scaling))
            }
            _ => crate::backend::linear(x2, w),
        };
        if let Some(bias) = &self.bias {
            y = y.add(bias.val().unsqueeze::<2>());
        }
        let mut out = dims;
        out[D - 1] = self.out_features();
        y.reshape(out)
    }

    /// This projection of `silu(gate) up` (`gate`, `up [rows, in]` -> `[rows, out]`), the MLP's
    /// down projection. Where the layer is a plain linear or plain LoRA (no bias, DoRA or
    /// training-time dropout) the SwiGLU and the projection are one operation that recomputes
    /// the `[rows, in]` product in the backward pass instead of keeping it.
    pub fn forward_swiglu(&self, gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
        let dropped = self.dropout.prob > 0.0 && B::ad_enabled(&gate.device());
        if self.bias.is_some() || self.magnitude.is_some() || dropped {
            return self.forward(crate::backend::swiglu(gate, up));
        }
        let adapter = match (self.effective_a(), &self.lora_b) {
            (Some(a), Some(b)) => Some((a, b.val())),
            _ => None,
        };
        crate::backend::swiglu_linear(gate, up, self.weight.val(), adapter, self.scaling)
    }

    /// DoRA on top of the bias-free base output `base = x W^T` (peft `DoraLinearLayer.forward`):
    /// `base + (m/n - 1) * xd W^T + (m/n) * scaling * xd A^T B^T` with `n = ||W + scaling B A||`
    /// detached and `xd = dropout(x)`; without dropout `xd W^T` is `base` itself.
    fn dora_delta(
        &self,
        base: Tensor<B, 2>,
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
        m: Tensor<B, 1>,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let norm = self.dora_weight_norm(w.clone(), a.clone(), b.clone());
        let scale = m.div(norm).unsqueeze::<2>();
        let dropped = self.dropout.prob > 0.0 && B::ad_enabled(&x.device());
        let xd = if dropped { self.dropout.forward(x) } else { x };
        let lora = crate::backend::linear(crate::backend::linear(xd.clone(), a), b)
            .mul_scalar(self.scaling);
        if dropped {
            let base_d = crate::backend::linear(xd, w);
            base.add(scale.clone().sub_scalar(1.0).mul(base_d))
                .add(scale.mul(lora))
        } else {
            scale.mul(base.add(lora))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    use crate::testing::TB;

    fn t2(data: Vec<f32>, shape: [usize; 2]) -> Tensor<TB, 2> {
        Tensor::from_data(TensorData::new(data, shape), &Default::default())
    }

    #[test]
    fn forward_matches_hand_computation() {
        // W = [[1,2],[3,4],[5,6]] (out 3, in 2), b = [0.5, -1, 0]
        let w = t2(vec![1., 2., 3., 4., 5., 6.], [3, 2]);
        let b = Tensor::from_data(
            TensorData::new(vec![0.5f32, -1., 0.], [3]),
            &Default::default(),
        );
        let lin = LoraLinear::new(w, Some(b));
        let x = Tensor::<TB, 3>::from_data(
            TensorData::new(vec![1f32, -1., 2., 0.5], [1, 2, 2]),
            &Default::default(),
        );
        let y = lin.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![-0.5, -2., -1., 3.5, 7., 13.]);
        // A = [[1, 1]] (r=1), B = [[1],[0],[2]], scaling 0.5: adds 0.5*(x0+x1)*[1,0,2]
        let lora =
            lin.with_lora_tensors(t2(vec![1., 1.], [1, 2]), t2(vec![1., 0., 2.], [3, 1]), 0.5);
        let y2 = lora.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y2, vec![-0.5, -2., -1., 4.75, 7., 15.5]);
        let merged = lora
            .merged()
            .forward(x)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(merged, y2);
    }

    #[test]
    fn fresh_adapter_leaves_output_unchanged() {
        let w =
            Tensor::<TB, 2>::random([4, 3], Distribution::Normal(0.0, 1.0), &Default::default());
        let base = LoraLinear::new(w, None);
        let x =
            Tensor::<TB, 2>::random([5, 3], Distribution::Normal(0.0, 1.0), &Default::default());
        let y0 = base.forward(x.clone()).into_data();
        let adapted = base.with_lora(2, 16.0, 0.0);
        assert_eq!(adapted.scaling, 8.0);
        assert_eq!(adapted.lora_a.as_ref().unwrap().dims(), [2, 3]);
        assert_eq!(adapted.lora_b.as_ref().unwrap().dims(), [4, 2]);
        adapted.forward(x).into_data().assert_eq(&y0, true);
    }

    #[test]
    fn nf4_base_forward_equals_dense_dequantized_forward() {
        let device = Default::default();
        let w = Tensor::<TB, 2>::random([96, 80], Distribution::Normal(0.0, 0.1), &device);
        let b = Tensor::<TB, 1>::random([96], Distribution::Normal(0.0, 0.1), &device);
        let host = w.clone().into_data().to_vec::<f32>().unwrap();
        let deq = crate::model::nf4::quantize_nf4(&host, &[96, 80])
            .unwrap()
            .dequantize()
            .unwrap();
        let a = Tensor::<TB, 2>::random([4, 80], Distribution::Normal(0.0, 0.1), &device);
        let bb = Tensor::<TB, 2>::random([96, 4], Distribution::Normal(0.0, 0.1), &device);
        let dense = LoraLinear::new(t2(deq, [96, 80]), Some(b.clone())).with_lora_tensors(
            a.clone(),
            bb.clone(),
            2.0,
        );
        let nf4 = LoraLinear::new(w, Some(b))
            .quantize_base_nf4()
            .unwrap()
            .with_lora_tensors(a, bb, 2.0);
        assert!(matches!(nf4.weight, BaseWeight::Nf4(_)));
        // 96 x 80 = 120 blocks: 960 words of nibbles, 30 of absmax codes, one scale.
        assert_eq!(nf4.weight.device_bytes(), (960 + 30) * 8 + 4);
        let x = Tensor::<TB, 3>::random([2, 3, 80], Distribution::Normal(0.0, 1.0), &device);
        for (d, q) in [
            (dense.clone(), nf4.clone()),
            (dense.with_dora(), nf4.with_dora()),
        ] {
            let y0 = d.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
            let y1 = q.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
            let diff = y0
                .iter()
                .zip(&y1)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-6, "NF4 forward differs by {diff}");
        }
    }

    #[test]
    fn dora_forward_and_merge_match_hand_computation() {
        // W = [[3, 4], [0, 2]], no adapter delta (B = 0): n = [5, 2]; m = [10, 1] scales rows by 2, 0.5.
        let w = t2(vec![3., 4., 0., 2.], [2, 2]);
        let lin = LoraLinear::new(w, None)
            .with_lora_tensors(t2(vec![1., 1.], [1, 2]), t2(vec![0., 0.], [2, 1]), 1.0)
            .with_dora();
        let m = lin
            .magnitude
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(m, vec![5., 2.]);
        let lin = lin.with_magnitude(Tensor::from_data(
            TensorData::new(vec![10f32, 1.], [2]),
            &Default::default(),
        ));
        let x = t2(vec![1., 1.], [1, 2]);
        let y = lin.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![14., 1.]);
        let merged = lin.merged();
        assert!(merged.magnitude.is_none());
        assert_eq!(
            merged.weight.val().into_data().to_vec::<f32>().unwrap(),
            vec![6., 8., 0., 1.]
        );
    }
}
