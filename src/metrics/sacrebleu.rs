//! sacreBLEU corpus BLEU with its default settings (exp smoothing, no lowercasing, one reference
//! per segment), reproducing sacrebleu 2.x: metrics/bleu.py (`_preprocess_segment` rstrip +
//! tokenize, n-gram statistics, `compute_bleu`, `utils.my_log`), tokenizers/tokenizer_13a.py,
//! tokenizer_zh.py and tokenizer_re.py.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

use crate::metrics::{is_python_space, python_split, Error};

/// sacreBLEU's `tokenize=` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SacreTokenizer {
    /// `13a`: mteval-v13a, sacreBLEU's default.
    Tokenizer13a,
    /// `zh`: every Chinese character (by sacreBLEU's ranges) is a token, the rest as 13a.
    Zh,
}

const MAX_ORDER: usize = 4;

/// sacreBLEU `corpus_bleu(predictions, [references], tokenize=..).score`, in [0, 100].
pub fn sacrebleu(
    predictions: &[String],
    references: &[String],
    tokenizer: SacreTokenizer,
) -> Result<f64, Error> {
    if predictions.len() != references.len() {
        return Err(Error::LengthMismatch {
            predictions: predictions.len(),
            references: references.len(),
        });
    }
    let mut stats = BleuStats::default();
    for (prediction, reference) in predictions.iter().zip(references) {
        let hyp = tokenize(prediction.trim_end_matches(is_python_space), tokenizer);
        let reference = tokenize(reference.trim_end_matches(is_python_space), tokenizer);
        stats.add_segment(&hyp, &reference);
    }
    Ok(stats.score())
}

/// Summed sufficient statistics of corpus BLEU.
#[derive(Debug, Default, Clone)]
struct BleuStats {
    sys_len: usize,
    ref_len: usize,
    correct: [usize; MAX_ORDER],
    total: [usize; MAX_ORDER],
}

impl BleuStats {
    fn add_segment(&mut self, hypothesis: &str, reference: &str) {
        let hyp: Vec<&str> = python_split(hypothesis).collect();
        let reference: Vec<&str> = python_split(reference).collect();
        self.sys_len += hyp.len();
        self.ref_len += reference.len();
        for n in 1..=MAX_ORDER {
            if hyp.len() < n {
                break;
            }
            let mut ref_counts: HashMap<&[&str], usize> = HashMap::new();
            if reference.len() >= n {
                for gram in reference.windows(n) {
                    *ref_counts.entry(gram).or_insert(0) += 1;
                }
            }
            let mut hyp_counts: HashMap<&[&str], usize> = HashMap::new();
            for gram in hyp.windows(n) {
                *hyp_counts.entry(gram).or_insert(0) += 1;
            }
            for (gram, count) in hyp_counts {
                self.total[n - 1] += count;
                self.correct[n - 1] += count.min(ref_counts.get(gram).copied().unwrap_or(0));
            }
        }
    }

    /// `BLEU.compute_bleu` with smooth_method='exp', effective_order=False.
    fn score(&self) -> f64 {
        let bp = if self.sys_len < self.ref_len {
            if self.sys_len > 0 {
                (1.0 - self.ref_len as f64 / self.sys_len as f64).exp()
            } else {
                0.0
            }
        } else {
            1.0
        };
        if self.correct.iter().all(|&c| c == 0) {
            return 0.0;
        }
        let mut precisions = [0.0f64; MAX_ORDER];
        let mut smooth_mteval = 1.0f64;
        let orders = precisions
            .iter_mut()
            .zip(self.correct.iter().zip(&self.total));
        for (precision, (&correct, &total)) in orders {
            if total == 0 {
                break;
            }
            *precision = if correct == 0 {
                smooth_mteval *= 2.0;
                100.0 / (smooth_mteval * total as f64)
            } else {
                100.0 * correct as f64 / total as f64
            };
        }
        // utils.my_log floors log(0) at -9999999999; Python's sum() adds left to right from 0.
        let log_sum = precisions.iter().fold(0.0, |acc, &p| {
            acc + if p == 0.0 { -9_999_999_999.0 } else { p.ln() }
        });
        bp * (log_sum / MAX_ORDER as f64).exp()
    }
}

/// The tokenized segment (tokens separated by single spaces).
pub fn tokenize(line: &str, tokenizer: SacreTokenizer) -> String {
    match tokenizer {
        SacreTokenizer::Tokenizer13a => tokenize_13a(line),
        SacreTokenizer::Zh => tokenize_zh(line),
    }
}

fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    tokenize_regexp(&format!(" {line} "))
}

fn tokenize_zh(line: &str) -> String {
    let line = line.trim_matches(is_python_space);
    let mut spaced = String::with_capacity(line.len() * 2);
    for c in line.chars() {
        if is_sacrebleu_chinese(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    tokenize_regexp(&spaced)
}

/// tokenizer_zh.py `_UCODE_RANGES`. Two of its ranges are written '\u20000'..'\u2a6d6' and
/// '\u2f800'..'\u2fa1d', which Python parses as two-character strings; compared with one
/// character they act as U+2001..=U+2A6D and U+2F81..=U+2FA1 (covering general punctuation
/// such as “ ” — … and many symbols, and subsuming its U+2600.. and U+2700.. ranges), and CJK
/// Extension B is *not* included. Reproduced as is.
fn is_sacrebleu_chinese(c: char) -> bool {
    matches!(c,
        '\u{3400}'..='\u{4db5}'
        | '\u{4e00}'..='\u{9fa5}'
        | '\u{9fa6}'..='\u{9fbb}'
        | '\u{f900}'..='\u{fa2d}'
        | '\u{fa30}'..='\u{fa6a}'
        | '\u{fa70}'..='\u{fad9}'
        | '\u{2001}'..='\u{2a6d}'
        | '\u{2f81}'..='\u{2fa1}'
        | '\u{ff00}'..='\u{ffef}'
        | '\u{2e80}'..='\u{2eff}'
        | '\u{3000}'..='\u{303f}'
        | '\u{31c0}'..='\u{31ef}'
        | '\u{2f00}'..='\u{2fdf}'
        | '\u{2ff0}'..='\u{2fff}'
        | '\u{3100}'..='\u{312f}'
        | '\u{31a0}'..='\u{31bf}'
        | '\u{fe10}'..='\u{fe1f}'
        | '\u{fe30}'..='\u{fe4f}'
        | '\u{3200}'..='\u{32ff}'
        | '\u{3300}'..='\u{33ff}'
    )
}

/// tokenizer_re.py `TokenizerRegexp`: four substitutions, then whitespace collapsed.
fn tokenize_regexp(line: &str) -> String {
    static RULES: OnceLock<[(Regex, &'static str); 4]> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        let rule = |pattern: &str, replacement: &'static str| {
            (Regex::new(pattern).expect("constant regex"), replacement)
        };
        [
            // Python: ([\{-\~\[-\` -\&\(-\+\:-\@\/])
            rule(
                r"([\x7B-\x7E\x5B-\x60\x20-\x26\x28-\x2B\x3A-\x40/])",
                " ${1} ",
            ),
            rule(r"([^0-9])([.,])", "${1} ${2} "),
            rule(r"([.,])([^0-9])", " ${1} ${2}"),
            rule(r"([0-9])(-)", "${1} ${2} "),
        ]
    });
    let mut line = line.to_string();
    for (regex, replacement) in rules {
        line = regex.replace_all(&line, *replacement).into_owned();
    }
    python_split(&line).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizers_match_sacrebleu_outputs() {
        // Expected strings from sacrebleu 2.6.0's Tokenizer13a / TokenizerZh.
        assert_eq!(
            tokenize(
                "Prices rose 3.5% in 2019-2020; the U.S. grew by $1,200.",
                SacreTokenizer::Tokenizer13a
            ),
            "Prices rose 3.5 % in 2019 - 2020 ; the U . S . grew by $ 1,200 ."
        );
        assert_eq!(
            tokenize(
                "He said &quot;hi&quot; &amp; left-\nearly <skipped>",
                SacreTokenizer::Tokenizer13a
            ),
            "He said \" hi \" & leftearly"
        );
        assert_eq!(
            tokenize("“简约”的设计，size S/M 2019年", SacreTokenizer::Zh),
            "“ 简 约 ” 的 设 计 ， size S / M 2019 年"
        );
    }

    #[test]
    fn no_match_and_empty_corpus_score_zero() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            sacrebleu(&s(&["zzz"]), &s(&["aaa bbb"]), SacreTokenizer::Tokenizer13a).unwrap(),
            0.0
        );
        // sacrebleu raises IndexError on an empty corpus; here it scores 0.
        assert_eq!(sacrebleu(&[], &[], SacreTokenizer::Zh).unwrap(), 0.0);
        assert!(sacrebleu(&s(&["a"]), &[], SacreTokenizer::Zh).is_err());
    }
}
