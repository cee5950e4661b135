//! CPU inference on quantized weights (issue 32): GGUF blocks read in place by SIMD kernels
//! ([`quant`]), a decoder for the dense llama-style families over them ([`model`]), and
//! generation through the shared sampling loop ([`engine`]). `runner generate --device cpu`
//! uses it for models without an adapter; `runner bench cpu-decode` times it.

pub mod bench;
pub mod engine;
pub mod model;
pub mod quant;
pub mod source;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use engine::{generate, generate_batched, prompt_logits, Session};
pub use model::{unsupported_reason, QuantModel};

/// Errors of the `infer` module.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("the CPU engine does not run {0}")]
    Unsupported(String),
    #[error("tensor `{tensor}`: {what}")]
    Weight { tensor: String, what: String },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::Error),
    #[error("{0}")]
    Load(String),
    #[error("cannot start the thread pool: {0}")]
    Threads(String),
    #[error(transparent)]
    Generate(#[from] crate::model::generate::GenerateError),
}

/// A Q8_0 copy of `model` on the CPU engine, to sample from (as vLLM-backed trainers sample from
/// a bf16 copy), when `B` is the f32 CPU backend, no projection carries an unmerged LoRA adapter
/// and the engine runs the model's family; `Ok(None)` otherwise, and the caller decodes through
/// burn.
pub fn sampling_copy<B: burn::tensor::backend::Backend>(
    model: &crate::model::decoder::CausalLm<B>,
) -> Result<Option<QuantModel>, InferError> {
    use std::any::TypeId;
    if TypeId::of::<B>() != TypeId::of::<crate::model::device::CpuBackend>()
        || unsupported_reason(&model.config).is_some()
        || model.has_lora()
    {
        return Ok(None);
    }
    let f32_copy = QuantModel::from_hf_tensors(model.config.clone(), model.to_hf_tensors())?;
    Ok(Some(f32_copy.into_q8_0()?))
}

/// A rayon pool of `threads` threads (None: RAYON_NUM_THREADS, else one per core).
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool, InferError> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        b = b.num_threads(n);
    }
    b.build().map_err(|e| InferError::Threads(e.to_string()))
}

/// The engine's model from a `.gguf` file (weights mapped in place) or an HF folder (f32).
pub fn open_model(path: &Path) -> Result<QuantModel, InferError> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return Ok(open_gguf(path)?.0);
    }
    let config = crate::model::config::ModelConfig::from_file(path.join("config.json"))
        .map_err(|e| InferError::Load(e.to_string()))?;
    let tensors = crate::model::hf::load_hf_folder_tensors(path)
        .map_err(|e| InferError::Load(e.to_string()))?;
    QuantModel::from_hf_tensors(config, tensors)
}

/// Opens a llama/qwen2/qwen3 GGUF for the engine: its config, tokenizer and weights (mapped,
/// not read).
pub fn open_gguf(
    path: &Path,
) -> Result<(QuantModel, crate::gguf::tokenizer::GgufTokenizer), InferError> {
    let file = crate::gguf::reader::GgufFile::open(path)?;
    let tok = crate::gguf::tokenizer::GgufTokenizer::from_gguf(&file)?;
    let config = crate::gguf::model::config_from_gguf(&file, &tok)?;
    Ok((QuantModel::from_gguf(file, config)?, tok))
}
