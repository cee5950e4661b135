//! NF4 dequantization of a QLoRA base weight (the layout of [`crate::model::nf4_linear`]:
//! nibbles packed 8 to an `i32` word, the first value high; one 8-bit absmax code per block of
//! 64 values, packed 4 to a word; one scale per 256 codes; one offset), as
//! bitsandbytes' `dequantize_4bit`: `code[nibble] * (dynamic[q] * scale + offset)`.
//!
//! [`composed`] is burn's operations (any backend, the reference); on CUDA one kernel
//! (`cuda/nf4.cu`) reads the packed words and writes the dense weight, where the composed form
//! unpacks every nibble into a 32-bit integer tensor and gathers through it (about 2.5 times the
//! dense weight's bytes in temporaries and a dozen kernels per projection).

// burn's `slice` takes one range per dimension: a one-element array is a 1-D slice.
#![allow(clippy::single_range_in_vec_init)]

use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, IntTensor},
    ElementConversion, Int, Tensor, TensorPrimitive,
};

/// Values per NF4 block (bitsandbytes' default for `quantize_4bit`).
pub const NF4_BLOCK: usize = 64;
/// Absmax values per block of the double quantization (`quantize_blockwise(blocksize=256)`).
pub const ABSMAX_BLOCK: usize = 256;

/// One NF4 weight's device tensors, as backend primitives.
pub struct Nf4Parts<B: Backend> {
    /// `[ceil(n / 64) * 8]` words of 8 nibbles.
    pub packed: IntTensor<B>,
    /// `[ceil(blocks / 4)]` words of 4 absmax codes.
    pub absmax_codes: IntTensor<B>,
    /// `[ceil(blocks / 256)]`.
    pub absmax_scales: FloatTensor<B>,
    /// The 16 NF4 code values.
    pub code: FloatTensor<B>,
    /// The 256 values of the signed dynamic map.
    pub dynamic: FloatTensor<B>,
    pub offset: f64,
    /// `[out, in]`.
    pub shape: [usize; 2],
}

/// Unpacks every `bits`-wide field of `words`, most significant first: `[words * 32 / bits]`.
pub(crate) fn unpack_words<B: Backend>(words: Tensor<B, 1, Int>, bits: usize) -> Tensor<B, 1, Int> {
    let per_word = 32 / bits;
    let mask = ((1i64 << bits) - 1).elem::<B::IntElem>();
    let fields: Vec<Tensor<B, 1, Int>> = (0..per_word)
        .map(|j| {
            let shift = (32 - bits * (j + 1)) as i64;
            words
                .clone()
                .bitwise_right_shift_scalar(shift.elem::<B::IntElem>())
                .bitwise_and_scalar(mask)
        })
        .collect();
    let n = words.dims()[0];
    Tensor::stack::<2>(fields, 1).reshape([n * per_word])
}

/// The dense `[out, in]` weight from burn's operations.
pub fn composed<B: Backend>(parts: Nf4Parts<B>) -> FloatTensor<B> {
    let float = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
    let [out, inp] = parts.shape;
    let n = out * inp;
    let blocks = n.div_ceil(NF4_BLOCK);
    let groups = blocks.div_ceil(ABSMAX_BLOCK);
    let codes = unpack_words(Tensor::<B, 1, Int>::from_primitive(parts.absmax_codes), 8);
    let padded = codes.dims()[0];
    // Pad the codes to whole groups of 256 so each group's scale broadcasts over its row.
    let codes = if padded < groups * ABSMAX_BLOCK {
        let pad = Tensor::<B, 1, Int>::zeros([groups * ABSMAX_BLOCK - padded], &codes.device());
        Tensor::cat(vec![codes, pad], 0)
    } else {
        codes.slice([0..groups * ABSMAX_BLOCK])
    };
    let absmax = float(parts.dynamic)
        .select(0, codes)
        .reshape([groups, ABSMAX_BLOCK])
        .mul(float(parts.absmax_scales).reshape([groups, 1]))
        .reshape([groups * ABSMAX_BLOCK])
        .slice([0..blocks])
        .add_scalar(parts.offset);
    let nibbles = unpack_words(Tensor::<B, 1, Int>::from_primitive(parts.packed), 4);
    let values = float(parts.code)
        .select(0, nibbles)
        .reshape([blocks, NF4_BLOCK])
        .mul(absmax.reshape([blocks, 1]))
        .reshape([blocks * NF4_BLOCK]);
    let values = if blocks * NF4_BLOCK == n {
        values
    } else {
        values.slice([0..n])
    };
    values.reshape([out, inp]).into_primitive().tensor()
}
