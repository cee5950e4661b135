pub mod config;
pub mod hf;
