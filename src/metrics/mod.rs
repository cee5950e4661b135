//! Evaluation metrics for generated text, bit-compatible with the Python scripts people compare
//! against: ChatGLM-6B's P-Tuning `compute_metrics` (nltk BLEU-4 over characters + rouge_chinese
//! ROUGE-1/2/L over jieba words), sacreBLEU corpus BLEU (13a and zh tokenizers), exact match and
//! GSM8K answer accuracy.
//!
//! References: THUDM/ChatGLM-6B ptuning/main.py; nltk 3.9 nltk/translate/bleu_score.py;
//! rouge_chinese 1.0.3 rouge.py/rouge_score.py; sacrebleu 2.x metrics/bleu.py, tokenizers/.

pub mod bleu;
pub mod gsm8k;
pub mod predictions;
pub mod rouge;
pub mod sacrebleu;
pub mod segment;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use rayon::prelude::*;

pub use bleu::{chatglm_bleu4, nltk_sentence_bleu4};
pub use gsm8k::{exact_match, gsm8k_accuracy, gsm8k_extract_gold, gsm8k_extract_prediction};
pub use predictions::{read_predictions, write_predictions, PredictionRow};
pub use rouge::{chatglm_rouge, RougeScores};
pub use sacrebleu::{sacrebleu, SacreTokenizer};
pub use segment::jieba;

/// Errors of the metrics module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rouge_chinese raises `ValueError("Reference is empty.")` for a blank reference.
    /// `index` is 0-based; messages count rows from 1.
    #[error("row {}: reference is empty (rouge_chinese raises \"Reference is empty.\")", .index + 1)]
    EmptyReference { index: usize },
    #[error("row {}: reference has no GSM8K \"####\" answer", .index + 1)]
    MissingGsm8kAnswer { index: usize },
    #[error("predictions and references differ in length: {predictions} predictions, {references} references")]
    LengthMismatch {
        predictions: usize,
        references: usize,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not valid JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: missing string field \"{key}\"")]
    MissingField {
        path: PathBuf,
        line: usize,
        key: String,
    },
}

/// The four ChatGLM-6B metrics as its script reports them: means of per-sample values that were
/// multiplied by 100 and rounded to 4 decimals.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ChatglmScores {
    #[serde(rename = "bleu-4")]
    pub bleu_4: f64,
    #[serde(rename = "rouge-1")]
    pub rouge_1: f64,
    #[serde(rename = "rouge-2")]
    pub rouge_2: f64,
    #[serde(rename = "rouge-l")]
    pub rouge_l: f64,
    pub count: usize,
}

/// Per-sample ChatGLM scores (each x100 and rounded to 4 decimals).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChatglmSample {
    pub bleu_4: f64,
    pub rouge_1: f64,
    pub rouge_2: f64,
    pub rouge_l: f64,
}

/// ChatGLM's per-sample scores for one (prediction, reference) pair.
pub fn chatglm_sample(prediction: &str, reference: &str) -> Result<ChatglmSample, Error> {
    let rouge = chatglm_rouge(prediction, reference).ok_or(Error::EmptyReference { index: 0 })?;
    Ok(ChatglmSample {
        bleu_4: chatglm_bleu4(prediction, reference),
        rouge_1: rouge.rouge_1,
        rouge_2: rouge.rouge_2,
        rouge_l: rouge.rouge_l,
    })
}

/// Per-sample ChatGLM scores for (prediction, reference) pairs, computed in parallel.
pub fn chatglm_samples(pairs: &[(String, String)]) -> Result<Vec<ChatglmSample>, Error> {
    pairs
        .par_iter()
        .enumerate()
        .map(|(index, (prediction, reference))| {
            chatglm_sample(prediction, reference).map_err(|_| Error::EmptyReference { index })
        })
        .collect()
}

/// ChatGLM-6B's `compute_metrics` over (prediction, reference) pairs. An empty input gives NaN
/// means, as `np.mean([])` does.
pub fn chatglm_scores(pairs: &[(String, String)]) -> Result<ChatglmScores, Error> {
    let samples = chatglm_samples(pairs)?;
    let column =
        |get: fn(&ChatglmSample) -> f64| numpy_mean(&samples.iter().map(get).collect::<Vec<_>>());
    Ok(ChatglmScores {
        bleu_4: column(|s| s.bleu_4),
        rouge_1: column(|s| s.rouge_1),
        rouge_2: column(|s| s.rouge_2),
        rouge_l: column(|s| s.rouge_l),
        count: samples.len(),
    })
}

/// `np.mean` of a float64 vector: numpy's pairwise summation (blocks of 8 partial sums,
/// unrolled, below 128 elements) divided by the length, so means match to the last bit.
pub fn numpy_mean(values: &[f64]) -> f64 {
    numpy_pairwise_sum(values) / values.len() as f64
}

fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        // numpy starts from -0.0 so that sums of negative zeros keep their sign.
        let mut res = -0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]];
        let mut i = 8;
        while i < n - (n % 8) {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[i..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_pairwise_sum(&a[..n2]) + numpy_pairwise_sum(&a[n2..])
    }
}

/// Python's `str.isspace` for one character: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F, which Python (but not Rust) treats as whitespace.
pub(crate) fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` with no argument.
pub(crate) fn python_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_python_space).filter(|w| !w.is_empty())
}

/// Python's `round(x, 4)`: the exact binary value rounded half-to-even to 4 decimals, which is
/// what Rust's `{:.4}` formatting does too; parsing back gives the nearest double, like Python.
pub(crate) fn python_round4(x: f64) -> f64 {
    format!("{x:.4}").parse().unwrap_or(x)
}
