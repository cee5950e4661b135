//! QLoRA 4-bit NormalFloat (NF4) storage as bitsandbytes 0.50 writes it (`quantize_4bit` with
//! `quant_type="nf4"`, `blocksize=64`, `compress_statistics=True`):
//! - values in blocks of 64 (over the flattened tensor, last block may be short), each scaled by its
//!   absmax and mapped to the nearest of the 16 NF4 code values (bucketize on midpoints, ties to the
//!   lower code: `bitsandbytes/backends/default/ops.py` `quantize_4bit`);
//! - two codes per byte, the even-indexed value in the high nibble (`q[0::2] << 4 | q[1::2]`);
//! - double quantization of the absmax values: `offset = mean(absmax)`, then blockwise 8-bit
//!   quantization of `absmax - offset` in blocks of 256 with `create_dynamic_map(signed=True)`
//!   (`functional.py` lines 296-348) as `backends/default/ops.py` `quantize_blockwise` does.
//!
//! Checked against `scripts/nf4_fixture.py`, which runs bitsandbytes' own CPU kernels for dequantization.

pub use crate::backend::nf4::{ABSMAX_BLOCK, NF4_BLOCK};

/// bitsandbytes' NF4 code (`backends/utils.py` `_NF4_QUANT_TABLE`, QLoRA paper appendix E).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Errors of NF4 quantization.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("nf4: shape {shape:?} holds {expected} values, got {got}")]
    ShapeMismatch {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("nf4: value {index} is not finite ({value})")]
    NonFinite { index: usize, value: f32 },
    #[error("nf4: {field} has {got} entries, expected {expected} for shape {shape:?}")]
    BadLayout {
        field: &'static str,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
}

/// A tensor in NF4 with double-quantized absmax values (bitsandbytes `QuantState` with `state2`).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    /// `ceil(n / 2)` bytes, value `2i` in the high nibble of byte `i`; an odd tail pads with code 7 (0.0).
    pub packed: Vec<u8>,
    /// One 8-bit dynamic code per 64-value block: the index into `dynamic_map()` of `absmax - offset`.
    pub absmax_q: Vec<u8>,
    /// One scale per 256 absmax values (`state2.absmax`).
    pub absmax_scales: Vec<f32>,
    /// Mean of the absmax values (`QuantState.offset`).
    pub offset: f32,
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` in float32, sorted.
/// `torch.linspace` is followed in its scalar CPU form (start + i*step below half, end - (steps-1-i)*step above).
pub fn dynamic_map() -> [f32; 256] {
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, decade) in DECADES.iter().enumerate() {
        let steps = (1usize << i) + 1;
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (steps - 1) as f32;
        let bound = |k: usize| {
            if k < steps / 2 {
                start + step * k as f32
            } else {
                end - step * (steps - k - 1) as f32
            }
        };
        let scale = *decade as f32;
        for k in 0..steps - 1 {
            let mean = (bound(k) + bound(k + 1)) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0.0; 256];
    map.copy_from_slice(&data);
    map
}

/// Blockwise absmax quantization of `values` onto a sorted `code`: one absmax per block and the
/// index of the nearest code value for each scaled value (ties to the lower index).
fn quantize_blockwise(values: &[f32], block: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    let midpoints: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    // Blocks are independent: runs of 4,096 blocks go to rayon's threads (a 7B model's
    // projections are 6.5 billion values) and are joined in order, so the result does not
    // depend on the thread count.
    let parts: Vec<(Vec<u8>, Vec<f32>)> = values
        .par_chunks(block * 4096)
        .map(|run| {
            let mut codes = Vec::with_capacity(run.len());
            let mut absmax = Vec::with_capacity(run.len().div_ceil(block));
            for chunk in run.chunks(block) {
                let max = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let inverse = 1.0 / max.max(1e-38);
                codes.extend(chunk.iter().map(|v| {
                    let scaled = (v * inverse).clamp(-1.0, 1.0);
                    // torch.bucketize(right=False): the number of midpoints strictly below.
                    midpoints.partition_point(|m| *m < scaled) as u8
                }));
                absmax.push(max);
            }
            (codes, absmax)
        })
        .collect();
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for (c, a) in parts {
        codes.extend(c);
        absmax.extend(a);
    }
    (codes, absmax)
}

/// Quantizes a row-major tensor to NF4 with double-quantized statistics.
pub fn quantize_nf4(values: &[f32], shape: &[usize]) -> Result<Nf4Tensor, Error> {
    let expected: usize = shape.iter().product();
    if expected != values.len() {
        return Err(Error::ShapeMismatch {
            shape: shape.to_vec(),
            expected,
            got: values.len(),
        });
    }
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite { index, value });
    }
    let (codes, absmax) = quantize_blockwise(values, NF4_BLOCK, &NF4_CODE);
    let packed = codes
        .chunks(2)
        .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(7))
        .collect();
    // torch's float32 mean; summing in f64 then rounding matches it to within an ulp.
    let offset = if absmax.is_empty() {
        0.0
    } else {
        (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
    };
    let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (absmax_q, absmax_scales) = quantize_blockwise(&centered, ABSMAX_BLOCK, &dynamic_map());
    Ok(Nf4Tensor {
        shape: shape.to_vec(),
        packed,
        absmax_q,
        absmax_scales,
        offset,
    })
}

impl Nf4Tensor {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the buffers fit the shape (for tensors read from files).
    pub fn validate(&self) -> Result<(), Error> {
        let n = self.len();
        let blocks = n.div_ceil(NF4_BLOCK);
        let checks = [
            ("packed", self.packed.len(), n.div_ceil(2)),
            ("absmax_q", self.absmax_q.len(), blocks),
            (
                "absmax_scales",
                self.absmax_scales.len(),
                blocks.div_ceil(ABSMAX_BLOCK),
            ),
        ];
        for (field, got, expected) in checks {
            if got != expected {
                return Err(Error::BadLayout {
                    field,
                    shape: self.shape.clone(),
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }

    /// The per-block absmax values: `dynamic_map()[q] * scale + offset` (`dequantize_blockwise` + offset).
    pub fn absmax(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.absmax_q
            .iter()
            .enumerate()
            .map(|(i, &q)| map[q as usize] * self.absmax_scales[i / ABSMAX_BLOCK] + self.offset)
            .collect()
    }

    /// Back to f32 (`dequantize_4bit`): `NF4_CODE[nibble] * absmax` of the value's block.
    pub fn dequantize(&self) -> Result<Vec<f32>, Error> {
        self.validate()?;
        let absmax = self.absmax();
        let n = self.len();
        let out = (0..n)
            .map(|i| {
                let byte = self.packed[i / 2];
                let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
                NF4_CODE[nibble as usize] * absmax[i / NF4_BLOCK]
            })
            .collect();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Case {
        name: String,
        shape: Vec<usize>,
        input: Vec<f32>,
        packed: Vec<u8>,
        absmax: Vec<f32>,
        offset: f32,
        absmax_q: Vec<u8>,
        absmax2: Vec<f32>,
        absmax_dequantized: Vec<f32>,
        output: Option<Vec<f32>>,
    }

    #[derive(Deserialize)]
    struct Fixture {
        nf4_code: Vec<f32>,
        dynamic_code: Vec<f32>,
        cases: Vec<Case>,
    }

    fn fixture() -> Fixture {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/train/nf4.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn tables_match_bitsandbytes() {
        let fx = fixture();
        assert_eq!(NF4_CODE.to_vec(), fx.nf4_code);
        assert_eq!(dynamic_map().to_vec(), fx.dynamic_code);
    }

    #[test]
    fn matches_bitsandbytes_fixture() {
        for case in fixture().cases {
            let q = quantize_nf4(&case.input, &case.shape).unwrap();
            let name = &case.name;
            assert_eq!(q.packed, case.packed, "{name}: packed nibbles");
            let absmax_direct = quantize_blockwise(&case.input, NF4_BLOCK, &NF4_CODE).1;
            assert_eq!(absmax_direct, case.absmax, "{name}: block absmax");
            // The mean is a float32 reduction in torch/numpy whose summation order differs from
            // runner's f64 sum; it may differ in the last bits, and the 256-block scales with it.
            let offset_tol = 4.0 * f32::EPSILON * case.offset.abs();
            assert!(
                (q.offset - case.offset).abs() <= offset_tol,
                "{name}: offset"
            );
            assert_eq!(q.absmax_q, case.absmax_q, "{name}: absmax codes");
            for (g, w) in q.absmax_scales.iter().zip(&case.absmax2) {
                assert!(
                    (g - w).abs() <= offset_tol + 4.0 * f32::EPSILON * w,
                    "{name}: scale {g} vs {w}"
                );
            }
            assert_eq!(q.absmax_scales.len(), case.absmax2.len());
            let tol = |w: f32| offset_tol + 8.0 * f32::EPSILON * w.abs().max(1e-30);
            for (g, w) in q.absmax().iter().zip(&case.absmax_dequantized) {
                assert!((g - w).abs() <= tol(*w), "{name}: absmax {g} vs {w}");
            }
            let out = q.dequantize().unwrap();
            for (i, (g, w)) in out.iter().zip(case.output.iter().flatten()).enumerate() {
                assert!((g - w).abs() <= tol(*w), "{name}: value {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn layout_and_packing_order() {
        // 130 values: 3 blocks (64, 64, 2), 65 bytes.
        let mut values = vec![0.0f32; 130];
        values[0] = -1.0; // code 0, high nibble of byte 0
        values[1] = 1.0; // code 15, low nibble of byte 0
        values[64] = 2.0;
        values[129] = -0.5;
        let q = quantize_nf4(&values, &[2, 65]).unwrap();
        assert_eq!(q.packed.len(), 65);
        assert_eq!(q.packed[0], 0x0F);
        assert_eq!(q.packed[1], 0x77);
        assert_eq!(q.absmax_q.len(), 3);
        assert_eq!(q.absmax_scales.len(), 1);
        let odd = quantize_nf4(&[0.5, -0.25, 1.0], &[3]).unwrap();
        assert_eq!(odd.packed.len(), 2);
        assert_eq!(odd.packed[1], 0xF7, "odd tail pads with the zero code");
    }

    #[test]
    fn round_trip_error_is_bounded() {
        // Deterministic pseudo-normal values with varying scales per row.
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32
        };
        let values: Vec<f32> = (0..64 * 300)
            .map(|i| {
                let s: f32 = (0..4).map(|_| uniform() - 0.5).sum();
                s * (1.0 + (i / 640) as f32)
            })
            .collect();
        let q = quantize_nf4(&values, &[300, 64]).unwrap();
        let out = q.dequantize().unwrap();
        let absmax = q.absmax();
        for (block, (vals, outs)) in values.chunks(64).zip(out.chunks(64)).enumerate() {
            let true_max = vals.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // The 8-bit dynamic code's widest gap near 1.0 is 0.9 / 64, so the absmax error is at most
            // half of that times the 256-block scale; NF4's widest half-gap is (1.0 - 0.6962) / 2.
            let absmax_err = (absmax[block] - true_max).abs();
            assert!(
                absmax_err <= 0.0071 * q.absmax_scales[block / ABSMAX_BLOCK],
                "block {block}: {absmax_err}"
            );
            for (v, o) in vals.iter().zip(outs) {
                assert!(
                    (v - o).abs() <= 0.1520 * true_max + absmax_err + 1e-6,
                    "{v} -> {o}"
                );
            }
        }
        let mse: f32 = values
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / values.len() as f32;
        let var: f32 = values.iter().map(|a| a * a).sum::<f32>() / values.len() as f32;
        assert!(mse / var < 0.02, "relative mse {}", mse / var);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            quantize_nf4(&[1.0, 2.0], &[3]),
            Err(Error::ShapeMismatch {
                shape: vec![3],
                expected: 3,
                got: 2
            })
        );
        assert!(matches!(
            quantize_nf4(&[1.0, f32::NAN], &[2]),
            Err(Error::NonFinite { index: 1, .. })
        ));
        let mut q = quantize_nf4(&[1.0; 10], &[10]).unwrap();
        q.packed.pop();
        let err = q.dequantize().unwrap_err().to_string();
        assert!(
            err.contains("packed") && err.contains("expected 5"),
            "{err}"
        );
    }
}
