//! GSM8K answer accuracy and exact match.
//!
//! Gold: the text after the last "####" of a GSM8K reference (openai/grade-school-math format).
//! Prediction: the content of the last `<answer>...</answer>` block (the GRPO reasoning format; a
//! final `<answer>` left open because generation stopped at "</answer>" counts as a block), else
//! the last number in the completion. Both sides are normalized the same way: whitespace, "$"
//! and thousands commas removed, trailing periods dropped, and "18.00" written "18".

use std::sync::OnceLock;

use regex::Regex;

use crate::metrics::{is_python_space, Error};

fn number_regex() -> &'static Regex {
    static NUMBER: OnceLock<Regex> = OnceLock::new();
    // Commas only between digits, so "3, 4" is two numbers and "1,000" one.
    NUMBER.get_or_init(|| Regex::new(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?").expect("constant regex"))
}

/// Normalized answer text; `None` when nothing is left.
fn normalize_answer(text: &str) -> Option<String> {
    let mut answer: String = text
        .chars()
        .filter(|&c| c != ',' && c != '$' && !is_python_space(c))
        .collect();
    while answer.ends_with('.') {
        answer.pop();
    }
    if let Some(rest) = answer.strip_prefix('+') {
        answer = rest.to_string();
    }
    // "18.00" and "18.50" are the numbers 18 and 18.5.
    if answer.contains('.')
        && answer
            .trim_start_matches('-')
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.')
    {
        let trimmed = answer.trim_end_matches('0').trim_end_matches('.');
        answer = trimmed.to_string();
    }
    if answer == "-0" {
        answer = "0".to_string();
    }
    (!answer.is_empty()).then_some(answer)
}

/// The last number in `text`, normalized.
fn last_number(text: &str) -> Option<String> {
    number_regex()
        .find_iter(text)
        .last()
        .and_then(|m| normalize_answer(m.as_str()))
}

/// The gold answer of a GSM8K reference: what follows the last "####", normalized.
pub fn gsm8k_extract_gold(reference: &str) -> Option<String> {
    let (_, after) = reference.rsplit_once("####")?;
    normalize_answer(after)
}

/// The answer of a completion: the last `<answer>` block's content if there is one (when that
/// content is not itself a bare number, the last number inside it), else the last number.
pub fn gsm8k_extract_prediction(completion: &str) -> Option<String> {
    if let Some(block) = last_answer_block(completion) {
        let normalized = normalize_answer(block)?;
        if number_regex().find(&normalized).map(|m| m.as_str()) == Some(normalized.as_str()) {
            return Some(normalized);
        }
        return last_number(block).or(Some(normalized));
    }
    last_number(completion)
}

fn last_answer_block(text: &str) -> Option<&str> {
    let start = text.rfind("<answer>")? + "<answer>".len();
    let rest = &text[start..];
    Some(rest.find("</answer>").map_or(rest, |end| &rest[..end]))
}

/// Percentage (0-100) of completions whose extracted answer equals the reference's gold answer.
/// A reference without "####" is an error; a completion without an answer counts as wrong.
pub fn gsm8k_accuracy(predictions: &[String], references: &[String]) -> Result<f64, Error> {
    check_lengths(predictions, references)?;
    let mut correct = 0usize;
    for (index, (prediction, reference)) in predictions.iter().zip(references).enumerate() {
        let gold = gsm8k_extract_gold(reference).ok_or(Error::MissingGsm8kAnswer { index })?;
        if gsm8k_extract_prediction(prediction).as_deref() == Some(gold.as_str()) {
            correct += 1;
        }
    }
    Ok(percentage(correct, predictions.len()))
}

/// Percentage (0-100) of predictions equal to their reference after stripping surrounding
/// whitespace (Python `str.strip()`).
pub fn exact_match(predictions: &[String], references: &[String]) -> Result<f64, Error> {
    check_lengths(predictions, references)?;
    let correct = predictions
        .iter()
        .zip(references)
        .filter(|(p, r)| p.trim_matches(is_python_space) == r.trim_matches(is_python_space))
        .count();
    Ok(percentage(correct, predictions.len()))
}

fn check_lengths(predictions: &[String], references: &[String]) -> Result<(), Error> {
    if predictions.len() != references.len() {
        return Err(Error::LengthMismatch {
            predictions: predictions.len(),
            references: references.len(),
        });
    }
    Ok(())
}

/// 0 for an empty set rather than NaN.
fn percentage(count: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * count as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_answers() {
        let cases = [
            (
                "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72",
                Some("72"),
            ),
            ("... so the total is $1,000.\n#### 1,000", Some("1000")),
            ("#### -3", Some("-3")),
            ("#### 2.50", Some("2.5")),
            ("#### 18.", Some("18")),
            ("x #### 1 #### 2", Some("2")),
            ("no marker 42", None),
            ("####   ", None),
        ];
        for (reference, expected) in cases {
            assert_eq!(
                gsm8k_extract_gold(reference).as_deref(),
                expected,
                "{reference:?}"
            );
        }
    }

    #[test]
    fn prediction_answers() {
        let cases = [
            ("The answer is 1,234.", Some("1234")),
            ("She pays $18.", Some("18")),
            ("It costs $5.50 in total", Some("5.5")),
            ("The temperature drops to -7 degrees.", Some("-7")),
            ("3 apples and 4 pears, so 3 + 4 = 7.", Some("7")),
            ("<answer>42</answer> but later 17", Some("42")),
            (
                "<answer>1</answer> wait <answer>$2,000.</answer>",
                Some("2000"),
            ),
            (
                "<reasoning>5*3=15</reasoning>\n<answer>\n15\n</answer>",
                Some("15"),
            ),
            ("<answer>18 dollars</answer>", Some("18")),
            ("<answer>18.00</answer>", Some("18")),
            ("<reasoning>2+2</reasoning><answer>4", Some("4")),
            ("<answer>four</answer>", Some("four")),
            ("<answer></answer> 12", None),
            ("I have no idea.", None),
            ("", None),
            ("Total: 0.5 hours", Some("0.5")),
            ("a list: 3, 4", Some("4")),
        ];
        for (completion, expected) in cases {
            assert_eq!(
                gsm8k_extract_prediction(completion).as_deref(),
                expected,
                "{completion:?}"
            );
        }
    }

    #[test]
    fn accuracy_and_exact_match() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let preds = s(&["so 72.", "<answer>1,000</answer>", "maybe 5"]);
        let refs = s(&["#### 72", "#### 1000", "#### 6"]);
        let accuracy = gsm8k_accuracy(&preds, &refs).unwrap();
        assert!((accuracy - 200.0 / 3.0).abs() < 1e-12);
        let err = gsm8k_accuracy(&s(&["1"]), &s(&["no gold"])).unwrap_err();
        assert!(err.to_string().contains("row 1:"), "{err}");
        assert_eq!(
            exact_match(&s(&[" a \n", "b"]), &s(&["a", "c"])).unwrap(),
            50.0
        );
        assert!(exact_match(&s(&["a"]), &[]).is_err());
    }
}
