//! The decoder model: HF config and checkpoint I/O, the decoder families in burn, LoRA linear,
//! KV-cached generation with s1 budget forcing, tiny random init and the `generate` CLI.

pub mod config;
pub mod decoder;
pub mod device;
pub mod generate;
pub mod hf;
pub mod hub;
pub mod init;
pub mod lora;
pub mod nf4;
pub mod nf4_linear;
pub mod prompt;
pub mod rope;

#[cfg(test)]
mod tests;
