//! Per-tensor type choice for an export type, as llama-quantize decides it
//! (llama.cpp src/llama-quant.cpp: `tensor_allows_quantization`, `llama_tensor_get_type_impl`,
//! `tensor_type_fallback`) for dense llama/qwen2 models, and the tensor order llama.cpp uses
//! (`weight_name_comparer`: non-block tensors first, then by layer, then by name).

use std::cmp::Ordering;

use crate::gguf::names::gguf_layer;
use crate::gguf::GgmlType;

/// Export types offered by `runner export --type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ExportType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_K_M,
}

impl std::str::FromStr for ExportType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportType::F32,
            "f16" => ExportType::F16,
            "bf16" => ExportType::BF16,
            "q8_0" => ExportType::Q8_0,
            "q4_0" => ExportType::Q4_0,
            "q4_k_m" => ExportType::Q4_K_M,
            other => {
                return Err(format!(
                    "unknown type `{other}` (expected f32, f16, bf16, q8_0, q4_0 or q4_k_m)"
                ))
            }
        })
    }
}

impl ExportType {
    /// `general.file_type` (llama.h `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q8_0 => 7,
            ExportType::Q4_K_M => 15,
            ExportType::BF16 => 32,
        }
    }

    /// The type most 2-D weights get (llama-quant.cpp `llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlType {
        match self {
            ExportType::F32 => GgmlType::F32,
            ExportType::F16 => GgmlType::F16,
            ExportType::BF16 => GgmlType::BF16,
            ExportType::Q8_0 => GgmlType::Q8_0,
            ExportType::Q4_0 => GgmlType::Q4_0,
            ExportType::Q4_K_M => GgmlType::Q4_K,
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(
            self,
            ExportType::Q8_0 | ExportType::Q4_0 | ExportType::Q4_K_M
        )
    }

    /// File name suffix as llama.cpp names outputs (e.g. `Q4_K_M`).
    pub fn label(self) -> &'static str {
        match self {
            ExportType::F32 => "F32",
            ExportType::F16 => "F16",
            ExportType::BF16 => "BF16",
            ExportType::Q8_0 => "Q8_0",
            ExportType::Q4_0 => "Q4_0",
            ExportType::Q4_K_M => "Q4_K_M",
        }
    }
}

/// llama.cpp tensor order (`weight_name_comparer`).
pub fn llama_cpp_order(a: &str, b: &str) -> Ordering {
    let la = gguf_layer(a).map_or(-1, |l| l as i64);
    let lb = gguf_layer(b).map_or(-1, |l| l as i64);
    la.cmp(&lb).then_with(|| a.cmp(b))
}

/// Model-wide facts the type choice depends on.
pub struct MixContext {
    pub n_layers: usize,
    /// No `output.weight`: token_embd doubles as the output projection.
    pub tied_embeddings: bool,
}

/// use_more_bits in llama-quant.cpp: first/last eighth of layers and every third in between.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The GGUF type of tensor `name` (GGUF naming) of row-major shape `hf_shape`.
pub fn tensor_type(name: &str, hf_shape: &[usize], et: ExportType, ctx: &MixContext) -> GgmlType {
    let quantizable =
        hf_shape.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight");
    if !quantizable {
        return GgmlType::F32;
    }
    let default = et.default_type();
    if !et.is_quantized() {
        return default;
    }
    let ncols = *hf_shape.last().unwrap_or(&1);
    let block = |t: GgmlType| t.block().map_or(1, |b| b.0);
    let layer = gguf_layer(name);
    let mut ty = default;
    let is_output = name == "output.weight" || (ctx.tied_embeddings && name == "token_embd.weight");
    if is_output {
        if !ncols.is_multiple_of(block(ty)) {
            ty = GgmlType::Q8_0;
        } else if ty != GgmlType::Q8_0 {
            ty = GgmlType::Q6_K;
        }
    } else if et == ExportType::Q4_K_M {
        let more = |l: Option<usize>| l.is_some_and(|l| use_more_bits(l, ctx.n_layers));
        if (name.contains("attn_v.weight") || name.contains("ffn_down")) && more(layer) {
            ty = GgmlType::Q6_K;
        }
    }
    if !ncols.is_multiple_of(block(ty)) {
        ty = match ty {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            other => other,
        };
        if !ncols.is_multiple_of(block(ty)) {
            ty = GgmlType::F16;
        }
    }
    ty
}
