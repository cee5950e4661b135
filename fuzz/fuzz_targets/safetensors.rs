//! A safetensors file's bytes: the length-prefixed JSON header, the tensors it declares, widened
//! to f32 (and the truncated-file diagnosis when the header points past the end).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use runner::model::hf::load_safetensors_bytes;

fuzz_target!(|data: &[u8]| {
    match load_safetensors_bytes(data, Path::new("fuzz.safetensors")) {
        Ok(tensors) => {
            for t in tensors.values() {
                assert_eq!(t.numel(), t.data.len());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
