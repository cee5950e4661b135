//! `export`: the model (a base, or a fine-tuned model with its LoRA merged) as GGUF, merged
//! safetensors, or a PEFT adapter, with an Ollama Modelfile beside each GGUF.

use super::artifact::model_folder;
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::gguf::mix::ExportType;
use serde::{Deserialize, Serialize};

pub struct Export;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Gguf,
    Safetensors,
    Peft,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default = "default_format")]
    pub format: ExportFormat,
    /// GGUF tensor type: f32, f16, bf16, q8_0, q4_0, q4_k_m.
    #[serde(rename = "type", default = "default_type")]
    pub qtype: String,
    /// File name stem of the GGUF (default: the model's name and type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn default_format() -> ExportFormat {
    ExportFormat::Gguf
}
fn default_type() -> String {
    "q8_0".into()
}

impl Stage for Export {
    type Params = Params;
    const KIND: &'static str = "export";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Export;
    const SUMMARY: &'static str =
        "export GGUF (with Ollama Modelfile), merged safetensors or a PEFT adapter";

    fn input_slots() -> &'static [InputSlot] {
        const SLOTS: &[InputSlot] = &[InputSlot::one(
            "model",
            &[ArtifactKind::Model, ArtifactKind::Trained],
        )];
        SLOTS
    }

    fn validate(params: &Params) -> Result<(), (String, String)> {
        if let Some(name) = &params.name {
            // The GGUF goes inside this stage's artifact: no folders, no `..`.
            let plain = !name.is_empty()
                && !name.starts_with('.')
                && !name.contains(['/', '\\'])
                && !name.chars().any(char::is_control);
            if !plain {
                return Err((
                    "name".to_string(),
                    format!("{name:?} must be a plain file name (no `/`, `\\`, leading `.` or control characters)"),
                ));
            }
        }
        params
            .qtype
            .parse::<ExportType>()
            .map(|_| ())
            .map_err(|e| ("type".to_string(), e.to_string()))
    }

    fn run(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
        let model = ctx.input("model")?;
        match params.format {
            ExportFormat::Peft => {
                let adapter = model.dir.join("adapter");
                if !adapter.is_dir() {
                    return Err(StageError::msg(
                        "format = \"peft\" needs a trained artifact with an adapter",
                    ));
                }
                crate::export::export_peft(&adapter, None, &ctx.out("adapter"))
                    .map_err(StageError::wrap)
            }
            ExportFormat::Safetensors => {
                let dir = model_folder(model.kind, &model.dir)?;
                crate::export::export_safetensors(
                    &dir,
                    None,
                    &ctx.out("model"),
                    crate::model::hf::DType::F32,
                )
                .map_err(StageError::wrap)
            }
            ExportFormat::Gguf => {
                let dir = model_folder(model.kind, &model.dir)?;
                let et: ExportType = params.qtype.parse().map_err(StageError::msg)?;
                let out = match &params.name {
                    Some(n) => ctx.out(&format!("{n}.gguf")),
                    None => ctx.out_dir.clone(),
                };
                let done =
                    crate::export::export_gguf(&dir, None, &out, et).map_err(StageError::wrap)?;
                tracing::info!(gguf = %done.gguf.display(), "exported");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Params {
        Params {
            format: ExportFormat::Gguf,
            qtype: "q8_0".into(),
            name: Some(name.into()),
        }
    }

    #[test]
    fn export_names_are_plain_file_names() {
        assert!(Export::validate(&named("medical-q8")).is_ok());
        for bad in ["../../x", "a/b", "..", ".hidden", "a\\b", "x\ny", ""] {
            let (key, message) = Export::validate(&named(bad)).unwrap_err();
            assert_eq!(key, "name", "{bad:?}");
            assert!(message.contains("plain file name"), "{message}");
        }
    }
}
