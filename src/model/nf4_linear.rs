//! The frozen base weight of a QLoRA projection held on the device in 4-bit NF4 and dequantized
//! on the fly in the forward with tensor ops (generic over `Backend`).
//!
//! Storage follows bitsandbytes' `Linear4bit` / `Params4bit` (`quant_type="nf4"`, `blocksize=64`,
//! `compress_statistics=True`; see [`crate::model::nf4`] for the host-side quantizer): 4-bit codes
//! in blocks of 64 values, and double-quantized block absmax values (one 8-bit code per block, one
//! f32 scale per 256 blocks, one f32 offset). burn has no `u8` tensors that every backend stores
//! natively, so the codes are packed into `Int` tensors 32 bits at a time: 8 nibbles per word for the
//! weights and 4 bytes per word for the absmax codes. Each word holds a `u32` bit pattern read as
//! `i32` (sign-extended where the backend's int is `i64`), so the same shifts and masks work with
//! CUDA's `i32` and ndarray's `i64` ints. On an `i32` backend a `[out, in]` weight takes
//! `out*in/2 + out*in/64` bytes plus 4 bytes per 256 blocks: 4.125 bits per weight.
//!
//! Dequantization (bitsandbytes `dequantize_4bit`): `code[nibble] * absmax[block]` with
//! `absmax = dynamic_map[q] * scale[q_block] + offset` (`dequantize_blockwise` + offset).

use burn::module::{Module, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::nf4::{dynamic_map, quantize_nf4, Error, Nf4Tensor, NF4_BLOCK, NF4_CODE};

/// Nibbles per packed word (32 bits).
const NIBBLES_PER_WORD: usize = 8;
/// Absmax codes (bytes) per packed word.
const BYTES_PER_WORD: usize = 4;

/// A `[out, in]` weight in NF4 on the device. The tensors are constants (no parameters, no
/// gradients): QLoRA keeps the base frozen.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// `[blocks * 64 / 8]`: value `8w + j` in bits `28 - 4j .. 32 - 4j` of word `w` (the first value
    /// in the high nibble, as bitsandbytes packs bytes); the tail of the last block pads with code 7 (0.0).
    pub packed: Tensor<B, 1, Int>,
    /// `[ceil(blocks / 4)]`: absmax code of block `4w + j` in bits `24 - 8j .. 32 - 8j` of word `w`.
    pub absmax_codes: Tensor<B, 1, Int>,
    /// `[ceil(blocks / 256)]`: one scale per 256 absmax codes (`state2.absmax`).
    pub absmax_scales: Tensor<B, 1>,
    /// The 16 NF4 code values.
    pub code: Tensor<B, 1>,
    /// The 256 values of bitsandbytes' signed dynamic map.
    pub dynamic: Tensor<B, 1>,
    /// Mean of the absmax values (`QuantState.offset`).
    pub offset: f64,
    pub out_features: usize,
    pub in_features: usize,
}

/// Packs `values` (each < 2^bits) into 32-bit words, most significant first, as sign-extended i64.
fn pack_words(values: impl Iterator<Item = u32>, bits: u32, per_word: usize) -> Vec<i64> {
    let mut words = Vec::new();
    let (mut word, mut filled) = (0u32, 0usize);
    for v in values {
        word |= v << (32 - bits * (filled as u32 + 1));
        filled += 1;
        if filled == per_word {
            words.push(word as i32 as i64);
            (word, filled) = (0, 0);
        }
    }
    if filled > 0 {
        words.push(word as i32 as i64);
    }
    words
}

impl<B: Backend> Nf4Weight<B> {
    /// Uploads a host NF4 tensor of shape `[out, in]`.
    pub fn from_nf4(q: &Nf4Tensor, device: &B::Device) -> Result<Self, Error> {
        q.validate()?;
        let [out_features, in_features] = match q.shape.as_slice() {
            &[o, i] => [o, i],
            _ => {
                return Err(Error::BadLayout {
                    field: "shape",
                    shape: q.shape.clone(),
                    expected: 2,
                    got: q.shape.len(),
                })
            }
        };
        let n = q.len();
        let blocks = n.div_ceil(NF4_BLOCK);
        // Nibbles of the packed bytes, padded with code 7 (0.0) to whole blocks.
        let nibbles = (0..blocks * NF4_BLOCK).map(|i| match q.packed.get(i / 2) {
            Some(&byte) if i < n => u32::from(if i % 2 == 0 { byte >> 4 } else { byte & 0x0F }),
            _ => 7,
        });
        let packed = pack_words(nibbles, 4, NIBBLES_PER_WORD);
        let codes = pack_words(q.absmax_q.iter().map(|&c| u32::from(c)), 8, BYTES_PER_WORD);
        let int = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [len]), device)
        };
        let float = |v: Vec<f32>| {
            let len = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [len]), device)
        };
        Ok(Self {
            packed: int(packed),
            absmax_codes: int(codes),
            absmax_scales: float(q.absmax_scales.clone()),
            code: float(NF4_CODE.to_vec()),
            dynamic: float(dynamic_map().to_vec()),
            offset: f64::from(q.offset),
            out_features,
            in_features,
        })
    }

    /// Quantizes a dense `[out, in]` weight (read back to the host once) as bitsandbytes does.
    pub fn quantize(weight: Tensor<B, 2>) -> Result<Self, Error> {
        let device = weight.device();
        let shape = weight.dims().to_vec();
        let data = weight
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
        Self::from_nf4(&quantize_nf4(&data, &shape)?, &device)
    }

    /// Quantizes the host values of a dense `[out, in]` weight as [`Self::quantize`] would
    /// after uploading them in the backend's float type, without the dense copy ever reaching
    /// the device (QLoRA loads a model one projection at a time).
    pub fn quantize_host(
        values: &[f32],
        shape: &[usize],
        device: &B::Device,
    ) -> Result<Self, Error> {
        use burn::tensor::{DType, Element};
        let rounded: Vec<f32>;
        let values = match <B::FloatElem as Element>::dtype() {
            DType::BF16 => {
                rounded = values
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect();
                &rounded
            }
            DType::F16 => {
                rounded = values
                    .iter()
                    .map(|v| half::f16::from_f32(*v).to_f32())
                    .collect();
                &rounded
            }
            _ => values,
        };
        Self::from_nf4(&quantize_nf4(values, shape)?, device)
    }

    /// Number of 64-value blocks.
    pub fn blocks(&self) -> usize {
        (self.out_features * self.in_features).div_ceil(NF4_BLOCK)
    }

    /// The dense `[out, in]` weight: `code[nibble] * absmax[block]` (one kernel on CUDA, see
    /// [`crate::backend::nf4`]).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        crate::backend::nf4_dequantize(
            self.packed.clone(),
            self.absmax_codes.clone(),
            self.absmax_scales.clone(),
            self.code.clone(),
            self.dynamic.clone(),
            self.offset,
            [self.out_features, self.in_features],
        )
    }

    /// Bytes the stored tensors take on the device (the code tables, 272 floats, excluded).
    pub fn device_bytes(&self) -> usize {
        let int = self.packed.dtype().size();
        let float = self.absmax_scales.dtype().size();
        (self.packed.dims()[0] + self.absmax_codes.dims()[0]) * int
            + self.absmax_scales.dims()[0] * float
    }
}

/// The frozen (or, for full fine-tuning, trained) weight of a [`crate::model::lora::LoraLinear`]:
/// dense `[out, in]` as in HF safetensors, or NF4 for QLoRA.
#[derive(Module, Debug)]
pub enum BaseWeight<B: Backend> {
    Dense(Param<Tensor<B, 2>>),
    Nf4(Nf4Weight<B>),
}

impl<B: Backend> BaseWeight<B> {
    /// The dense weight `[out, in]` (NF4 is dequantized).
    pub fn val(&self) -> Tensor<B, 2> {
        match self {
            Self::Dense(w) => w.val(),
            Self::Nf4(q) => q.dequantize(),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Dense(w) => w.dims(),
            Self::Nf4(q) => [q.out_features, q.in_features],
        }
    }

    pub fn device(&self) -> B::Device {
        match self {
            Self::Dense(w) => w.device(),
            Self::Nf4(q) => q.packed.device(),
        }
    }

    /// Turns gradients off (NF4 weights never have any).
    pub fn set_require_grad(self, require_grad: bool) -> Self {
        match self {
            Self::Dense(w) => Self::Dense(w.set_require_grad(require_grad)),
            nf4 => nf4,
        }
    }

    /// Bytes of the stored tensors on the device.
    pub fn device_bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.dims().iter().product::<usize>() * w.val().dtype().size(),
            Self::Nf4(q) => q.device_bytes(),
        }
    }
}

impl<B: AutodiffBackend> BaseWeight<B> {
    /// The gradient of a dense weight (`Param::grad`); NF4 weights have none.
    pub fn grad(&self, grads: &B::Gradients) -> Option<Tensor<B::InnerBackend, 2>> {
        match self {
            Self::Dense(w) => w.grad(grads),
            Self::Nf4(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    use crate::testing::TB;

    #[test]
    fn pack_words_puts_the_first_field_high() {
        let words = pack_words([1u32, 2, 3, 4, 5, 6, 7, 15, 9].into_iter(), 4, 8);
        assert_eq!(
            words,
            vec![0x1234567Fu32 as i32 as i64, 0x9000_0000u32 as i32 as i64]
        );
        let device = Default::default();
        let t = Tensor::<TB, 1, Int>::from_data(TensorData::new(words, [2]), &device);
        let fields = crate::backend::nf4::unpack_words(t, 4)
            .into_data()
            .to_vec::<i64>()
            .unwrap();
        assert_eq!(
            fields,
            vec![1, 2, 3, 4, 5, 6, 7, 15, 9, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn device_dequantization_equals_host_dequantization() {
        let device = Default::default();
        // 300 x 70: 328 blocks (2 absmax groups, the last short) and a short last block.
        for shape in [[300usize, 70usize], [8, 8]] {
            let w = Tensor::<TB, 2>::random(shape, Distribution::Normal(0.0, 0.05), &device);
            let host = w.clone().into_data().to_vec::<f32>().unwrap();
            let q = quantize_nf4(&host, &shape).unwrap();
            let want = q.dequantize().unwrap();
            let nf4 = Nf4Weight::<TB>::from_nf4(&q, &device).unwrap();
            let got = nf4.dequantize().into_data().to_vec::<f32>().unwrap();
            assert_eq!(got.len(), want.len());
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-7, "{shape:?}: max difference {diff}");
            // Packed sizes: 8 nibbles and 4 absmax codes per word, one scale per 256 blocks.
            let blocks = (shape[0] * shape[1]).div_ceil(64);
            assert_eq!(nf4.packed.dims(), [blocks * 8]);
            assert_eq!(nf4.absmax_codes.dims(), [blocks.div_ceil(4)]);
            assert_eq!(nf4.absmax_scales.dims(), [blocks.div_ceil(256)]);
        }
    }
}
