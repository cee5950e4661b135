//! ROUGE-1/2/L F-scores exactly as ChatGLM-6B's ptuning/main.py gets them from rouge_chinese
//! 1.0.3: `Rouge().get_scores(' '.join(jieba.cut(pred)), ' '.join(jieba.cut(label)))[0][m]['f']`,
//! x100, `round(.., 4)`.
//!
//! rouge_chinese (rouge.py `Rouge._get_scores`, `cut_sent`; rouge_score.py `rouge_n`,
//! `rouge_l_summary_level`) does, per string: four sentence-splitting regex substitutions, rstrip,
//! split on "\n", drop empty pieces, collapse whitespace in each piece, then split each piece on
//! " " and flatten (a whitespace-only piece thus yields one empty-string word). ROUGE-N counts
//! *distinct* n-grams (exclusive=True: sets). Despite its name, `rouge_l_summary_level` in 1.0.3
//! is a plain LCS between the flattened word lists, not the union-LCS of the ROUGE paper.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use regex::Regex;

use crate::metrics::segment::cut_like_python;
use crate::metrics::{is_python_space, python_round4, python_split};

/// Per-sample ROUGE F-scores, x100 and rounded to 4 decimals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeScores {
    pub rouge_1: f64,
    pub rouge_2: f64,
    pub rouge_l: f64,
}

/// ChatGLM's per-sample ROUGE scores. A whitespace-only prediction is scored as hypothesis "-"
/// (rouge_chinese would raise "Hypothesis is empty."). Returns `None` where rouge_chinese raises
/// `ValueError("Reference is empty.")`: a reference that is empty or whitespace-only.
pub fn chatglm_rouge(prediction: &str, reference: &str) -> Option<RougeScores> {
    let mut hypothesis = jieba_join(prediction);
    if hypothesis.chars().all(is_python_space) {
        hypothesis = "-".to_string();
    }
    let reference = jieba_join(reference);
    let hyp_para = rouge_paragraph(&hypothesis);
    let ref_para = rouge_paragraph(&reference);
    let ref_list = rouge_word_list(&ref_para)?;
    let hyp_list = rouge_word_list(&hyp_para)?;
    let mut vocabulary = HashMap::new();
    let hyp_words = intern(&hyp_list, &mut vocabulary);
    let ref_words = intern(&ref_list, &mut vocabulary);
    Some(RougeScores {
        rouge_1: python_round4(rouge_n(&hyp_words, &ref_words, 1) * 100.0),
        rouge_2: python_round4(rouge_n(&hyp_words, &ref_words, 2) * 100.0),
        rouge_l: python_round4(rouge_l(&hyp_words, &ref_words) * 100.0),
    })
}

/// `' '.join(jieba.cut(text))` (accurate mode, HMM on).
pub fn jieba_join(text: &str) -> String {
    cut_like_python(text).join(" ")
}

/// rouge_chinese's `Rouge.cut_sent` substitutions, in order.
fn sentence_rules() -> &'static [(Regex, &'static str); 4] {
    static RULES: OnceLock<[(Regex, &'static str); 4]> = OnceLock::new();
    RULES.get_or_init(|| {
        let rule = |pattern: &str, replacement: &'static str| {
            (Regex::new(pattern).expect("constant regex"), replacement)
        };
        [
            rule("([。！？?])([^”’])", "${1}\n${2}"),
            rule(r"(\.{6})([^”’])", "${1}\n${2}"),
            rule("(…{2})([^”’])", "${1}\n${2}"),
            rule("([。！？?][”’])([^，。！？?])", "${1}\n${2}"),
        ]
    })
}

/// rouge_chinese's `cut_sent` up to the split: the substitutions, then `rstrip()`.
fn rouge_paragraph(text: &str) -> Cow<'_, str> {
    let mut para = Cow::Borrowed(text);
    for (regex, replacement) in sentence_rules() {
        if let Cow::Owned(replaced) = regex.replace_all(&para, *replacement) {
            para = Cow::Owned(replaced);
        }
    }
    match para {
        Cow::Borrowed(text) => Cow::Borrowed(text.trim_end_matches(is_python_space)),
        Cow::Owned(text) => Cow::Owned(text.trim_end_matches(is_python_space).to_string()),
    }
}

/// The flattened words rouge_chinese scores for one paragraph, or `None` when it has no sentence
/// (rouge_chinese raises "Hypothesis is empty." / "Reference is empty.").
fn rouge_word_list(para: &str) -> Option<Vec<&str>> {
    let mut words = Vec::new();
    let mut sentences = 0;
    for piece in para.split('\n').filter(|piece| !piece.is_empty()) {
        sentences += 1;
        let before = words.len();
        words.extend(python_split(piece));
        if words.len() == before {
            words.push("");
        }
    }
    (sentences > 0).then_some(words)
}

fn intern<'a>(words: &[&'a str], vocabulary: &mut HashMap<&'a str, u32>) -> Vec<u32> {
    words
        .iter()
        .map(|word| {
            let next = vocabulary.len() as u32;
            *vocabulary.entry(word).or_insert(next)
        })
        .collect()
}

/// rouge_chinese `f_r_p_rouge_n` F-score (with its 1e-8 in the denominator).
fn f_score(overlap: usize, hypothesis_count: usize, reference_count: usize) -> f64 {
    let precision = if hypothesis_count == 0 {
        0.0
    } else {
        overlap as f64 / hypothesis_count as f64
    };
    let recall = if reference_count == 0 {
        0.0
    } else {
        overlap as f64 / reference_count as f64
    };
    2.0 * ((precision * recall) / (precision + recall + 1e-8))
}

/// ROUGE-N over sets of distinct n-grams.
fn rouge_n(hypothesis: &[u32], reference: &[u32], n: usize) -> f64 {
    let grams = |words: &[u32]| -> HashSet<Vec<u32>> {
        if words.len() < n {
            return HashSet::new();
        }
        words.windows(n).map(<[u32]>::to_vec).collect()
    };
    let hyp = grams(hypothesis);
    let reference = grams(reference);
    let overlap = hyp.intersection(&reference).count();
    f_score(overlap, hyp.len(), reference.len())
}

/// rouge_chinese's `rouge_l_summary_level`: LCS of the flattened word lists.
fn rouge_l(hypothesis: &[u32], reference: &[u32]) -> f64 {
    let lcs = lcs_len(reference, hypothesis) as f64;
    let recall = lcs / reference.len() as f64;
    let precision = lcs / hypothesis.len() as f64;
    2.0 * ((precision * recall) / (precision + recall + 1e-8))
}

fn lcs_len(x: &[u32], y: &[u32]) -> usize {
    let mut previous = vec![0usize; y.len() + 1];
    let mut current = vec![0usize; y.len() + 1];
    for &xi in x {
        for (j, &yj) in y.iter().enumerate() {
            current[j + 1] = if xi == yj {
                previous[j] + 1
            } else {
                previous[j + 1].max(current[j])
            };
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[y.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_only_piece_is_one_empty_word() {
        // Python: [" ".join(s.split()) for s in cut_sent("a \n \n b") if len(s) > 0]
        // = ["a", "", "b"] -> words ["a", "", "b"].
        let para = rouge_paragraph("a \n \n b");
        assert_eq!(rouge_word_list(&para).unwrap(), vec!["a", "", "b"]);
        let para = rouge_paragraph("好 。 看 ？ ？ 吗");
        assert_eq!(
            rouge_word_list(&para).unwrap(),
            vec!["好", "。", "看", "？", "？", "吗"]
        );
    }

    #[test]
    fn empty_reference_is_none_like_rouge_chinese_value_error() {
        assert!(chatglm_rouge("好看", "").is_none());
        assert!(chatglm_rouge("好看", " \n ").is_none());
        assert!(chatglm_rouge("", "好看").is_some());
    }

    #[test]
    fn identical_texts_score_just_under_100() {
        // 2 * (1 * 1) / (2 + 1e-8) * 100 = 99.9999999500..., rounded to 4 decimals -> 100.0.
        let s = chatglm_rouge("这款外套非常百搭。", "这款外套非常百搭。").unwrap();
        assert_eq!((s.rouge_1, s.rouge_2, s.rouge_l), (100.0, 100.0, 100.0));
    }

    #[test]
    fn lcs_matches_textbook_example() {
        assert_eq!(lcs_len(&[1, 2, 3, 2, 4, 1, 2], &[2, 4, 3, 1, 2, 1]), 4);
        assert_eq!(lcs_len(&[], &[1]), 0);
    }
}
