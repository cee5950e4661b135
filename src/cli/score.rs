//! `runner score`: scores a predictions.jsonl file with the ChatGLM-6B metrics (default),
//! sacreBLEU, GSM8K accuracy and exact match. Prints a table, and with `--json` one JSON object
//! on the last line: `bleu-4`, `rouge-1`, `rouge-2`, `rouge-l` (0-100, as ChatGLM's script
//! reports them), `count`, plus `sacrebleu`, `gsm8k-accuracy`, `exact-match` when requested.

use std::path::PathBuf;

use anyhow::Context;

use runner::metrics::predictions::read_pairs;
use runner::metrics::{chatglm_scores, exact_match, gsm8k_accuracy, sacrebleu, SacreTokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricName {
    /// BLEU-4 and ROUGE-1/2/L as ChatGLM-6B's P-Tuning script.
    Chatglm,
    /// sacreBLEU corpus BLEU (see --sacrebleu-tokenize).
    Sacrebleu,
    /// GSM8K answer accuracy (gold after "####" in the reference), in percent.
    Gsm8k,
    /// Exact match after stripping surrounding whitespace, in percent.
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenizeName {
    #[value(name = "13a")]
    T13a,
    Zh,
}

/// Score generated predictions against references.
#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// JSON-lines file with one object per sample.
    #[arg(long, value_name = "FILE.jsonl")]
    pub predictions: PathBuf,
    /// Field holding the generated text.
    #[arg(long, default_value = "prediction")]
    pub prediction_field: String,
    /// Field holding the reference text.
    #[arg(long, default_value = "reference")]
    pub reference_field: String,
    /// Metrics to compute, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "chatglm")]
    pub metrics: Vec<MetricName>,
    /// sacreBLEU tokenizer.
    #[arg(long, value_enum, default_value = "13a")]
    pub sacrebleu_tokenize: TokenizeName,
    /// Also print the scores as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &ScoreArgs) -> anyhow::Result<()> {
    let report = score(args)?;
    let width = report.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in &report {
        match value.as_f64() {
            Some(x) if !value.is_u64() => println!("{key:<width$}  {x:>10.4}"),
            _ => println!("{key:<width$}  {:>10}", value.to_string()),
        }
    }
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}

/// The scores `run` prints, keyed as in its JSON line.
pub fn score(args: &ScoreArgs) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let path = &args.predictions;
    let pairs = read_pairs(path, &args.prediction_field, &args.reference_field)?;
    let (predictions, references): (Vec<String>, Vec<String>) = pairs.iter().cloned().unzip();
    let context = || format!("scoring {}", path.display());
    let mut report = serde_json::Map::new();
    let number =
        |x: f64| serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, Into::into);
    if args.metrics.contains(&MetricName::Chatglm) {
        let scores = chatglm_scores(&pairs).with_context(context)?;
        report.insert("bleu-4".into(), number(scores.bleu_4));
        report.insert("rouge-1".into(), number(scores.rouge_1));
        report.insert("rouge-2".into(), number(scores.rouge_2));
        report.insert("rouge-l".into(), number(scores.rouge_l));
    }
    report.insert("count".into(), pairs.len().into());
    if args.metrics.contains(&MetricName::Sacrebleu) {
        let tokenizer = match args.sacrebleu_tokenize {
            TokenizeName::T13a => SacreTokenizer::Tokenizer13a,
            TokenizeName::Zh => SacreTokenizer::Zh,
        };
        let bleu = sacrebleu(&predictions, &references, tokenizer).with_context(context)?;
        report.insert("sacrebleu".into(), number(bleu));
    }
    if args.metrics.contains(&MetricName::Gsm8k) {
        let accuracy = gsm8k_accuracy(&predictions, &references).with_context(context)?;
        report.insert("gsm8k-accuracy".into(), number(accuracy));
    }
    if args.metrics.contains(&MetricName::Exact) {
        let matched = exact_match(&predictions, &references).with_context(context)?;
        report.insert("exact-match".into(), number(matched));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        score: ScoreArgs,
    }

    #[test]
    fn parses_flags_and_scores_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"out\": \"答案是 72。\", \"gold\": \"#### 72\"}\n{\"out\": \"<answer>5</answer>\", \"gold\": \"#### 6\"}\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "score",
            "--predictions",
            path.to_str().unwrap(),
            "--prediction-field",
            "out",
            "--reference-field",
            "gold",
            "--metrics",
            "chatglm,gsm8k,exact,sacrebleu",
            "--json",
        ])
        .unwrap();
        let report = score(&cli.score).unwrap();
        let keys: Vec<&str> = report.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "bleu-4",
                "rouge-1",
                "rouge-2",
                "rouge-l",
                "count",
                "sacrebleu",
                "gsm8k-accuracy",
                "exact-match"
            ]
        );
        assert_eq!(report["count"], 2);
        assert_eq!(report["gsm8k-accuracy"], 50.0);
        assert_eq!(report["exact-match"], 0.0);
        run(&cli.score).unwrap();

        let cli = Cli::try_parse_from(["score", "--predictions", path.to_str().unwrap()]).unwrap();
        let err = format!("{:#}", score(&cli.score).unwrap_err());
        assert!(
            err.contains("p.jsonl:1: missing string field \"prediction\""),
            "{err}"
        );
    }
}
