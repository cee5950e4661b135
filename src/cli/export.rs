//! CLI layer: `runner export ...` and `runner convert x.gguf --to hf DIR`.

use std::path::PathBuf;

use anyhow::{bail, Context};

use runner::gguf::mix::ExportType;
use runner::model::hf::DType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Gguf,
    Safetensors,
    Peft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[allow(non_camel_case_types)]
/// Spelt as llama.cpp and recipes spell them (`q8_0`, any case), not clap's `q8-0`.
pub enum ExportTypeArg {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0", alias = "q8-0")]
    Q8_0,
    #[value(name = "q4_0", alias = "q4-0")]
    Q4_0,
    #[value(name = "q4_k_m", alias = "q4-k-m")]
    Q4_K_M,
}

impl From<ExportTypeArg> for ExportType {
    fn from(t: ExportTypeArg) -> Self {
        match t {
            ExportTypeArg::F32 => ExportType::F32,
            ExportTypeArg::F16 => ExportType::F16,
            ExportTypeArg::Bf16 => ExportType::BF16,
            ExportTypeArg::Q8_0 => ExportType::Q8_0,
            ExportTypeArg::Q4_0 => ExportType::Q4_0,
            ExportTypeArg::Q4_K_M => ExportType::Q4_K_M,
        }
    }
}

/// `runner export`: write a trained model as GGUF, an HF safetensors folder, or a PEFT adapter.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Base model: a Hugging Face folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter folder merged into the base before export.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "gguf")]
    pub format: ExportFormat,
    /// GGUF tensor type (gguf), or f32/bf16 for safetensors.
    #[arg(long = "type", value_enum, ignore_case = true, default_value = "q8_0")]
    pub qtype: ExportTypeArg,
    /// Output file (gguf) or folder.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    match args.format {
        ExportFormat::Gguf => {
            let r = runner::export::export_gguf(
                &args.model,
                args.adapter.as_deref(),
                &args.out,
                args.qtype.into(),
            )
            .with_context(|| format!("exporting {} to GGUF", args.model.display()))?;
            println!(
                "wrote {} ({} tensors) and {}",
                r.gguf.display(),
                r.tensor_types.len(),
                r.modelfile.display()
            );
        }
        ExportFormat::Safetensors => {
            let dtype = match args.qtype {
                ExportTypeArg::F32 => DType::F32,
                ExportTypeArg::Bf16 => DType::BF16,
                other => bail!("--format safetensors takes --type f32 or bf16, not {other:?}"),
            };
            runner::export::export_safetensors(
                &args.model,
                args.adapter.as_deref(),
                &args.out,
                dtype,
            )
            .with_context(|| format!("exporting {} to safetensors", args.model.display()))?;
            println!("wrote {}", args.out.display());
        }
        ExportFormat::Peft => {
            let Some(adapter) = &args.adapter else {
                bail!("--format peft needs --adapter PATH")
            };
            runner::export::export_peft(adapter, Some(&args.model), &args.out)
                .with_context(|| format!("exporting adapter {}", adapter.display()))?;
            println!("wrote {}", args.out.display());
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertTarget {
    Hf,
}

/// `runner convert x.gguf --to hf DIR`: a GGUF (llama/qwen2) back to a Hugging Face folder.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// Input .gguf file.
    pub input: PathBuf,
    #[arg(long = "to", value_enum)]
    pub to: ConvertTarget,
    /// Output folder.
    pub out: PathBuf,
    /// Store weights as bf16 instead of f32.
    #[arg(long)]
    pub bf16: bool,
}

pub fn run_convert(args: &ConvertArgs) -> anyhow::Result<()> {
    let dtype = if args.bf16 { DType::BF16 } else { DType::F32 };
    match args.to {
        ConvertTarget::Hf => runner::export::convert_gguf_to_hf(&args.input, &args.out, dtype)
            .with_context(|| {
                format!(
                    "converting {} to a Hugging Face folder",
                    args.input.display()
                )
            })?,
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{ExportArgs, ExportTypeArg};

    #[test]
    fn export_type_is_spelt_as_llama_cpp_spells_it() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ExportArgs,
        }
        let parse = |t: &str| {
            Cli::try_parse_from(["runner", "--model", "m", "--out", "o", "--type", t])
                .map(|c| c.args.qtype)
        };
        for (spelling, want) in [
            ("q8_0", ExportTypeArg::Q8_0),
            ("Q8_0", ExportTypeArg::Q8_0),
            ("q8-0", ExportTypeArg::Q8_0),
            ("q4_k_m", ExportTypeArg::Q4_K_M),
            ("Q4_K_M", ExportTypeArg::Q4_K_M),
            ("q4_0", ExportTypeArg::Q4_0),
            ("bf16", ExportTypeArg::Bf16),
        ] {
            assert_eq!(parse(spelling).unwrap(), want, "{spelling}");
        }
        let err = parse("q5_k").unwrap_err().to_string();
        assert!(err.contains("q8_0") && err.contains("q4_k_m"), "{err}");
    }
}
