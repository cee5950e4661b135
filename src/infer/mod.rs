//! CPU inference on quantized weights (issue 32): GGUF blocks read in place by SIMD kernels
//! ([`quant`]), a decoder for the dense llama-style families over them ([`model`]), and
//! generation through the shared sampling loop ([`engine`]). `runner generate --device cpu`
//! uses it for models without an adapter; `runner bench cpu-decode` times it.
//!
//! On CUDA, `gpu` (with the `cuda` feature) is the decode engine (issue 31), and [`Generator`]
//! is how stages and commands generate from a burn model: through that engine when it runs the
//! model, else through burn.

pub mod bench;
pub mod engine;
#[cfg(feature = "cuda")]
pub mod gpu;
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

/// Generation from a burn model, built once for many batches: on CUDA through the GPU decode
/// engine (`infer::gpu`, built with the `cuda` feature) when it runs the model (no
/// prompt-learning adapter, a supported family, room for its copy), else through burn's decoder
/// ([`crate::model::generate`]). A failure of the engine is logged and the batch decoded
/// through burn.
pub struct Generator<'a, B: burn::tensor::backend::Backend> {
    model: &'a crate::model::decoder::CausalLm<B>,
    adapter: Option<&'a crate::model::prompt::PromptAdapter<B>>,
    #[cfg(feature = "cuda")]
    engine: Option<gpu::GpuModel>,
}

impl<'a, B: burn::tensor::backend::Backend> Generator<'a, B> {
    pub fn new(
        model: &'a crate::model::decoder::CausalLm<B>,
        adapter: Option<&'a crate::model::prompt::PromptAdapter<B>>,
    ) -> Self {
        Self {
            model,
            adapter,
            #[cfg(feature = "cuda")]
            engine: adapter.is_none().then(|| gpu::engine_for(model)).flatten(),
        }
    }

    /// Whether batches go through the GPU engine.
    pub fn on_engine(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.engine.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// [`crate::model::generate::generate_prompted`] for one batch.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        opts: &crate::model::generate::GenerateOptions,
        decode: Option<crate::model::generate::DecodeFn<'_>>,
    ) -> Result<Vec<crate::model::generate::Generation>, crate::model::generate::GenerateError>
    {
        #[cfg(feature = "cuda")]
        if let Some(engine) = &self.engine {
            match gpu::generate(engine, prompts, opts, decode) {
                Err(crate::model::generate::GenerateError::Device(e)) => {
                    tracing::warn!("the GPU decode engine failed, decoding through burn: {e}");
                }
                done => return done,
            }
        }
        crate::model::generate::generate_prompted(self.model, self.adapter, prompts, opts, decode)
    }
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
