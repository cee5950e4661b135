//! A linear layer in Hugging Face layout with an optional LoRA adapter.
//!
//! `weight` is `[out, in]` and `bias` `[out]` exactly as in HF safetensors, so base keys load
//! unchanged; `lora_a` `[r, in]` and `lora_b` `[out, r]` follow peft's `lora_A`/`lora_B`
//! layout. Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
//! peft `tuners/lora/layer.py` (`Linear.forward`, kaiming-uniform A, zero B,
//! `scaling = alpha / r`).

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

/// `y = x W^T + b + scaling * dropout(x) A^T B^T`.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
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
}

impl<B: Backend> LoraLinear<B> {
    /// A plain linear layer from HF-layout tensors (`weight [out, in]`, `bias [out]`).
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            lora_a: None,
            lora_b: None,
            lora_e: None,
            scaling: 0.0,
            dropout: DropoutConfig::new(0.0).init(),
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

    /// The adapter's `A`, times `E` row-wise for AdaLoRA (`A * E`, peft `SVDLinear`).
    fn effective_a(&self) -> Option<Tensor<B, 2>> {
        let a = self.lora_a.as_ref()?.val();
        Some(match &self.lora_e {
            Some(e) => a.mul(e.val()),
            None => a,
        })
    }

    /// Folds the adapter into `weight` (`W + scaling * B A`, or `B (A * E)`) and drops it.
    pub fn merged(mut self) -> Self {
        if let (Some(a), Some(b)) = (self.effective_a(), self.lora_b.take()) {
            self.lora_a = None;
            self.lora_e = None;
            let delta = b.val().matmul(a).mul_scalar(self.scaling);
            let w = self.weight.val().add(delta);
            self.weight = Param::from_tensor(w);
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
        let mut y = x2.clone().matmul(self.weight.val().transpose());
        if let Some(b) = &self.bias {
            y = y.add(b.val().unsqueeze::<2>());
        }
        if let (Some(a), Some(b)) = (self.effective_a(), &self.lora_b) {
            let low = self
                .dropout
                .forward(x2)
                .matmul(a.transpose())
                .matmul(b.val().transpose());
            y = y.add(low.mul_scalar(self.scaling));
        }
        let mut out = dims;
        out[D - 1] = self.out_features();
        y.reshape(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type TB = NdArray<f32>;

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
}
