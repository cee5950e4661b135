//! A GGUF file's bytes: header, metadata, tensor infos, every tensor's data (dequantized where
//! runner can), then the tokenizer and model config read from the metadata.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runner::gguf::model::config_from_gguf;
use runner::gguf::quants::can_dequantize;
use runner::gguf::reader::GgufFile;
use runner::gguf::tokenizer::GgufTokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for t in &f.tensors {
        let bytes = f.tensor_bytes(t).expect("checked when the file was opened");
        if can_dequantize(t.ty) {
            match f.tensor_f32(t) {
                Ok(x) => assert_eq!(x.numel() as u64, t.n_elements()),
                Err(e) => panic!("tensor `{}` ({} bytes): {e}", t.name, bytes.len()),
            }
        }
    }
    if let Ok(tok) = GgufTokenizer::from_gguf(&f) {
        let _ = tok.to_tokenizer_json(std::path::Path::new("fuzz.gguf"));
        let _ = tok.to_tokenizer_config_json();
        let _ = config_from_gguf(&f, &tok);
    }
});
