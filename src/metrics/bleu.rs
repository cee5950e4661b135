//! Sentence BLEU-4 exactly as nltk's `sentence_bleu(..., smoothing_function=method3)` computes it
//! (nltk/translate/bleu_score.py: modified_precision, closest_ref_length, brevity_penalty,
//! SmoothingFunction.method3, `math.fsum` of weighted logs), applied to characters as ChatGLM-6B's
//! ptuning/main.py does: `sentence_bleu([list(label)], list(pred), ...)`, x100, `round(.., 4)`.

use std::collections::HashMap;
use std::hash::Hash;

/// ChatGLM's per-sample BLEU-4: nltk sentence BLEU over Unicode code points, x100, rounded to
/// 4 decimals.
pub fn chatglm_bleu4(prediction: &str, reference: &str) -> f64 {
    let hypothesis: Vec<char> = prediction.chars().collect();
    let reference: Vec<char> = reference.chars().collect();
    crate::metrics::python_round4(nltk_sentence_bleu4(&reference, &hypothesis) * 100.0)
}

/// nltk `sentence_bleu([reference], hypothesis, weights=(0.25,)*4,
/// smoothing_function=SmoothingFunction().method3)` for one reference, in [0, 1].
pub fn nltk_sentence_bleu4<T: Eq + Hash>(reference: &[T], hypothesis: &[T]) -> f64 {
    let mut numerators = [0usize; 4];
    let mut denominators = [0usize; 4];
    for n in 1..=4 {
        let (numerator, denominator) = modified_precision(reference, hypothesis, n);
        numerators[n - 1] = numerator;
        denominators[n - 1] = denominator;
    }
    // nltk returns 0 (no smoothing applied) when not a single unigram matches; this also covers
    // the empty hypothesis.
    if numerators[0] == 0 {
        return 0.0;
    }
    let bp = brevity_penalty(reference.len(), hypothesis.len());
    // method3 (NIST geometric sequence): the k-th zero-match order gets 1 / (2^k * denominator).
    let mut zero_orders = 0;
    let logs: Vec<f64> = (0..4)
        .map(|i| {
            let p = if numerators[i] == 0 {
                zero_orders += 1;
                1.0 / (2f64.powi(zero_orders) * denominators[i] as f64)
            } else {
                // Fraction -> float is the correctly rounded quotient, as is f64 division of
                // exactly representable integers.
                numerators[i] as f64 / denominators[i] as f64
            };
            0.25 * p.ln()
        })
        .collect();
    bp * fsum(&logs).exp()
}

/// nltk's modified (clipped) n-gram precision as (numerator, denominator); the denominator is
/// `max(1, number of hypothesis n-grams)`.
fn modified_precision<T: Eq + Hash>(reference: &[T], hypothesis: &[T], n: usize) -> (usize, usize) {
    if hypothesis.len() < n {
        return (0, 1);
    }
    let mut hyp_counts: HashMap<&[T], usize> = HashMap::new();
    for gram in hypothesis.windows(n) {
        *hyp_counts.entry(gram).or_insert(0) += 1;
    }
    let mut ref_counts: HashMap<&[T], usize> = HashMap::new();
    if reference.len() >= n {
        for gram in reference.windows(n) {
            if hyp_counts.contains_key(gram) {
                *ref_counts.entry(gram).or_insert(0) += 1;
            }
        }
    }
    let clipped = hyp_counts
        .iter()
        .map(|(gram, &count)| count.min(ref_counts.get(gram).copied().unwrap_or(0)))
        .sum();
    (clipped, (hypothesis.len() + 1 - n).max(1))
}

/// nltk's brevity penalty for one reference (the closest reference length is that reference's).
fn brevity_penalty(reference_len: usize, hypothesis_len: usize) -> f64 {
    if hypothesis_len > reference_len {
        1.0
    } else if hypothesis_len == 0 {
        0.0
    } else {
        (1.0 - reference_len as f64 / hypothesis_len as f64).exp()
    }
}

/// Python's `math.fsum`: the correctly rounded sum (Shewchuk's partials, as in mathmodule.c).
/// Inputs here are finite logs, so the inf/nan branches of CPython are not needed.
pub(crate) fn fsum(values: &[f64]) -> f64 {
    let mut partials: Vec<f64> = Vec::with_capacity(values.len());
    for &value in values {
        let mut x = value;
        let mut kept = 0;
        for j in 0..partials.len() {
            let mut y = partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        partials.truncate(kept);
        partials.push(x);
    }
    // Sum the partials from the top, correcting for half-way rounding like CPython does.
    let mut n = partials.len();
    let mut hi = 0.0;
    if n > 0 {
        n -= 1;
        hi = partials[n];
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            n -= 1;
            let y = partials[n];
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        if n > 0 && ((lo < 0.0 && partials[n - 1] < 0.0) || (lo > 0.0 && partials[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            let yr = x - hi;
            if y == yr {
                hi = x;
            }
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<&str> {
        s.split_whitespace().collect()
    }

    #[test]
    fn nltk_docstring_hypothesis1_matches() {
        // nltk: sentence_bleu([reference1], hypothesis1, smoothing_function=method3)
        // = 0.41180376356915777 (nltk 3.10.4, this single reference).
        let reference =
            words("It is a guide to action that ensures that the military will forever heed Party commands");
        let hypothesis =
            words("It is a guide to action which ensures that the military always obeys the commands of the party");
        let (num, den) = modified_precision(&reference, &hypothesis, 2);
        assert_eq!((num, den), (8, 17));
        let score = nltk_sentence_bleu4(&reference, &hypothesis);
        assert!((score - 0.411_803_763_569_157_77).abs() < 1e-12, "{score}");
    }

    #[test]
    fn empty_or_unmatched_hypothesis_scores_zero() {
        assert_eq!(chatglm_bleu4("", "参考文本"), 0.0);
        assert_eq!(chatglm_bleu4("龘", "参考文本"), 0.0);
        assert_eq!(chatglm_bleu4("参考文本", "参考文本"), 100.0);
    }

    #[test]
    fn fsum_is_correctly_rounded() {
        assert_eq!(
            fsum(&[1e100, 1.0, -1e100, 1e-100, 1e50, -1.0, -1e50]),
            1e-100
        );
        assert_eq!(fsum(&[0.1; 10]), 1.0);
        assert_eq!(fsum(&[]), 0.0);
    }
}
