//! GRPO reward functions and group advantages.
//!
//! The five GSM8K rewards are those of the R1-style GRPO recipe (willccbb's `grpo_demo.py`, used by
//! TRL's GRPO examples): correctness, int, strict format, soft format and xml count, scored with
//! Python semantics (`str.strip`, `str.isdigit`, `str.count`, `re.match` without flags), checked against
//! `scripts/rewards_fixture.py`. Advantages follow TRL 1.16 `GRPOTrainer._generate_and_score_completions`
//! with `scale_rewards = "group"`: `(r - mean) / (std + 1e-4)`, std with Bessel's correction
//! (`trl.trainer.utils.nanstd`, as `torch.std`).

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Errors of reward configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reward {index} (kind \"regex\"): invalid pattern {pattern:?}: {message}")]
    BadPattern {
        index: usize,
        pattern: String,
        message: String,
    },
    #[error("reward {index} (kind \"length_penalty\"): `max_chars` must be > 0")]
    ZeroMaxChars { index: usize },
    #[error("group_advantages: {len} rewards do not split into groups of {group_size}")]
    BadGroup { len: usize, group_size: usize },
}

/// One reward function of a recipe (`[[stages.grpo.rewards]] kind = "correctness"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RewardKind {
    /// 2.0 when the `<answer>` text equals the GSM8K answer (text after `####`).
    Correctness,
    /// 0.5 when the `<answer>` text is all digits (`str.isdigit`).
    Int,
    /// 0.5 on `re.match(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", c)`.
    StrictFormat,
    /// 0.5 on `re.match(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", c)`.
    SoftFormat,
    /// Up to 0.5 for well-placed tags, minus 0.001 per character after `</answer>`.
    XmlCount,
    /// 1.0 when the pattern matches at the start of the completion (as `re.match`).
    /// Rust `regex` syntax: no look-around or back-references; `$` only matches at the very end.
    Regex { pattern: String },
    /// 1.0 when the stripped completion equals the stripped reference.
    ExactMatch,
    /// `-min(1, max(0, chars - max_chars) / max_chars)`.
    LengthPenalty { max_chars: usize },
}

/// A reward function and its weight in the summed reward (TRL `reward_weights`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardSpec {
    #[serde(flatten)]
    pub kind: RewardKind,
    pub weight: f32,
}

/// The keys a reward of each kind takes besides `kind` and `weight`.
fn reward_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "regex" => &["pattern"],
        "length_penalty" => &["max_chars"],
        _ => &[],
    }
}

// By hand, because serde's `flatten` cannot deny unknown fields: a misspelt `wieght` must be an
// error, not a reward trained with weight 1.
impl<'de> Deserialize<'de> for RewardSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let weight = match map.remove("weight") {
            None => 1.0,
            Some(v) => serde_json::from_value::<f32>(v)
                .map_err(|e| D::Error::custom(format!("`weight`: {e}")))?,
        };
        let kind = map
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let mut allowed = vec!["kind", "weight"];
        allowed.extend_from_slice(reward_keys(&kind));
        if let Some(bad) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            let hint = crate::text::suggest::nearest(bad, allowed.iter().copied())
                .map(|n| format!(", did you mean `{n}`?"))
                .unwrap_or_default();
            return Err(D::Error::custom(format!(
                "unknown key `{bad}` in a reward of kind \"{kind}\"{hint} (its keys: {})",
                allowed.join(", ")
            )));
        }
        let kind =
            serde_json::from_value(serde_json::Value::Object(map)).map_err(D::Error::custom)?;
        Ok(Self { kind, weight })
    }
}

enum Scorer {
    Correctness,
    Int,
    Format(Regex),
    XmlCount,
    Regex(Regex),
    ExactMatch,
    LengthPenalty(usize),
}

/// The compiled reward functions of a stage.
pub struct RewardSet {
    scorers: Vec<(Scorer, f32)>,
    names: Vec<String>,
}

// Python's `$` (no MULTILINE) also matches before a final newline: `\n?\z` gives the same verdict
// for re.match. Python's `\s` adds U+001C..U+001F to Unicode White_Space, which Rust's `\s` is.
const STRICT_FORMAT: &str = r"\A<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n\n?\z";
const SOFT_FORMAT: &str = r"\A<reasoning>.*?</reasoning>[\s\x1C-\x1F]*<answer>.*?</answer>";

impl RewardSet {
    pub fn new(specs: &[RewardSpec]) -> Result<Self, Error> {
        let mut scorers = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let scorer = match &spec.kind {
                RewardKind::Correctness => Scorer::Correctness,
                RewardKind::Int => Scorer::Int,
                RewardKind::StrictFormat => Scorer::Format(fixed_regex(STRICT_FORMAT)),
                RewardKind::SoftFormat => Scorer::Format(fixed_regex(SOFT_FORMAT)),
                RewardKind::XmlCount => Scorer::XmlCount,
                RewardKind::Regex { pattern } => {
                    Scorer::Regex(Regex::new(&format!(r"\A(?:{pattern})")).map_err(|e| {
                        Error::BadPattern {
                            index,
                            pattern: pattern.clone(),
                            message: e.to_string(),
                        }
                    })?)
                }
                RewardKind::ExactMatch => Scorer::ExactMatch,
                RewardKind::LengthPenalty { max_chars: 0 } => {
                    return Err(Error::ZeroMaxChars { index })
                }
                RewardKind::LengthPenalty { max_chars } => Scorer::LengthPenalty(*max_chars),
            };
            scorers.push((scorer, spec.weight));
        }
        let names = specs
            .iter()
            .map(|s| kind_name(&s.kind).to_string())
            .collect();
        Ok(Self { scorers, names })
    }

    /// The R1 GSM8K recipe: the five rewards, each with weight 1.
    pub fn gsm8k_r1() -> Self {
        let kinds = [
            RewardKind::XmlCount,
            RewardKind::SoftFormat,
            RewardKind::StrictFormat,
            RewardKind::Int,
            RewardKind::Correctness,
        ];
        let specs: Vec<RewardSpec> = kinds
            .into_iter()
            .map(|kind| RewardSpec { kind, weight: 1.0 })
            .collect();
        Self::new(&specs).expect("built-in reward patterns compile")
    }

    /// Names for logging (`rewards/<name>` as TRL logs them).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The unweighted score of each reward function, in spec order.
    pub fn score(&self, completion: &str, reference: &str) -> Vec<f32> {
        self.scorers
            .iter()
            .map(|(s, _)| score_one(s, completion, reference) as f32)
            .collect()
    }

    /// The weighted sum of `score` (TRL's `rewards_per_func * reward_weights` summed).
    pub fn weighted_sum(&self, scores: &[f32]) -> f32 {
        scores
            .iter()
            .zip(&self.scorers)
            .map(|(s, (_, w))| s * w)
            .sum()
    }

    /// Per-function scores and their weighted sum.
    pub fn score_total(&self, completion: &str, reference: &str) -> (Vec<f32>, f32) {
        let scores = self.score(completion, reference);
        let total = self.weighted_sum(&scores);
        (scores, total)
    }
}

fn fixed_regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("built-in reward pattern compiles")
}

fn kind_name(kind: &RewardKind) -> &'static str {
    match kind {
        RewardKind::Correctness => "correctness",
        RewardKind::Int => "int",
        RewardKind::StrictFormat => "strict_format",
        RewardKind::SoftFormat => "soft_format",
        RewardKind::XmlCount => "xml_count",
        RewardKind::Regex { .. } => "regex",
        RewardKind::ExactMatch => "exact_match",
        RewardKind::LengthPenalty { .. } => "length_penalty",
    }
}

fn score_one(scorer: &Scorer, completion: &str, reference: &str) -> f64 {
    let flag = |hit: bool, value: f64| if hit { value } else { 0.0 };
    match scorer {
        Scorer::Correctness => flag(
            extract_xml_answer(completion) == extract_hash_answer(reference),
            2.0,
        ),
        Scorer::Int => flag(py_isdigit(extract_xml_answer(completion)), 0.5),
        Scorer::Format(re) => flag(re.is_match(completion), 0.5),
        Scorer::XmlCount => count_xml(completion),
        Scorer::Regex(re) => flag(re.is_match(completion), 1.0),
        Scorer::ExactMatch => flag(py_strip(completion) == py_strip(reference), 1.0),
        Scorer::LengthPenalty(max_chars) => {
            let over = completion.chars().count().saturating_sub(*max_chars) as f64;
            -(over / *max_chars as f64).min(1.0)
        }
    }
}

/// The text after the last `<answer>` up to the next `</answer>`, stripped (the whole text without tags).
pub fn extract_xml_answer(text: &str) -> &str {
    let after = text.rsplit("<answer>").next().unwrap_or(text);
    py_strip(after.split("</answer>").next().unwrap_or(after))
}

/// The GSM8K answer: the text between the first and a second `####`, stripped. Without `####` the
/// stripped reference itself (the recipe would give None), so pre-extracted answers work.
pub fn extract_hash_answer(reference: &str) -> &str {
    match reference.split("####").nth(1) {
        Some(answer) => py_strip(answer),
        None => py_strip(reference),
    }
}

/// The recipe's `count_xml`.
pub fn count_xml(text: &str) -> f64 {
    let once = |needle: &str| text.matches(needle).count() == 1;
    let last_len = |sep: &str| text.rsplit(sep).next().unwrap_or(text).chars().count() as f64;
    let mut count = 0.0;
    if once("<reasoning>\n") {
        count += 0.125;
    }
    if once("\n</reasoning>\n") {
        count += 0.125;
    }
    if once("\n<answer>\n") {
        count += 0.125;
        count -= last_len("\n</answer>\n") * 0.001;
    }
    if once("\n</answer>") {
        count += 0.125;
        count -= (last_len("\n</answer>") - 1.0) * 0.001;
    }
    count
}

/// Python's `str.isspace` for one character: Unicode White_Space plus U+001C..U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` without arguments.
pub fn py_strip(text: &str) -> &str {
    text.trim_matches(py_isspace)
}

/// Python 3.11's `str.isdigit`: non-empty and every character has Numeric_Type Digit or Decimal.
pub fn py_isdigit(text: &str) -> bool {
    !text.is_empty()
        && text.chars().all(|c| {
            let c = c as u32;
            PY_DIGIT_RANGES
                .binary_search_by(|&(lo, hi)| {
                    if hi < c {
                        std::cmp::Ordering::Less
                    } else if lo > c {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                })
                .is_ok()
        })
}

/// Code point ranges where Python 3.11 (Unicode 14.0) `chr(c).isdigit()` holds, generated by
/// `[c for c in range(0x110000) if chr(c).isdigit()]` grouped into ranges.
#[rustfmt::skip]
const PY_DIGIT_RANGES: &[(u32, u32)] = &[
    (0x30, 0x39), (0xB2, 0xB3), (0xB9, 0xB9), (0x660, 0x669), (0x6F0, 0x6F9), (0x7C0, 0x7C9),
    (0x966, 0x96F), (0x9E6, 0x9EF), (0xA66, 0xA6F), (0xAE6, 0xAEF), (0xB66, 0xB6F), (0xBE6, 0xBEF),
    (0xC66, 0xC6F), (0xCE6, 0xCEF), (0xD66, 0xD6F), (0xDE6, 0xDEF), (0xE50, 0xE59), (0xED0, 0xED9),
    (0xF20, 0xF29), (0x1040, 0x1049), (0x1090, 0x1099), (0x1369, 0x1371), (0x17E0, 0x17E9), (0x1810, 0x1819),
    (0x1946, 0x194F), (0x19D0, 0x19DA), (0x1A80, 0x1A89), (0x1A90, 0x1A99), (0x1B50, 0x1B59), (0x1BB0, 0x1BB9),
    (0x1C40, 0x1C49), (0x1C50, 0x1C59), (0x2070, 0x2070), (0x2074, 0x2079), (0x2080, 0x2089), (0x2460, 0x2468),
    (0x2474, 0x247C), (0x2488, 0x2490), (0x24EA, 0x24EA), (0x24F5, 0x24FD), (0x24FF, 0x24FF), (0x2776, 0x277E),
    (0x2780, 0x2788), (0x278A, 0x2792), (0xA620, 0xA629), (0xA8D0, 0xA8D9), (0xA900, 0xA909), (0xA9D0, 0xA9D9),
    (0xA9F0, 0xA9F9), (0xAA50, 0xAA59), (0xABF0, 0xABF9), (0xFF10, 0xFF19), (0x104A0, 0x104A9), (0x10A40, 0x10A43),
    (0x10D30, 0x10D39), (0x10E60, 0x10E68), (0x11052, 0x1105A), (0x11066, 0x1106F), (0x110F0, 0x110F9), (0x11136, 0x1113F),
    (0x111D0, 0x111D9), (0x112F0, 0x112F9), (0x11450, 0x11459), (0x114D0, 0x114D9), (0x11650, 0x11659), (0x116C0, 0x116C9),
    (0x11730, 0x11739), (0x118E0, 0x118E9), (0x11950, 0x11959), (0x11C50, 0x11C59), (0x11D50, 0x11D59), (0x11DA0, 0x11DA9),
    (0x16A60, 0x16A69), (0x16AC0, 0x16AC9), (0x16B50, 0x16B59), (0x1D7CE, 0x1D7FF), (0x1E140, 0x1E149), (0x1E2F0, 0x1E2F9),
    (0x1E950, 0x1E959), (0x1F100, 0x1F10A), (0x1FBF0, 0x1FBF9),
];

/// GRPO advantages: `(r - group mean) / (group std + 1e-4)` over consecutive groups of
/// `group_size` completions of one prompt; std is unbiased (N - 1) as TRL's `nanstd`, and 0 for
/// groups of one (TRL's `num_generations == 1` branch).
pub fn group_advantages(rewards: &[f32], group_size: usize) -> Result<Vec<f32>, Error> {
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        return Err(Error::BadGroup {
            len: rewards.len(),
            group_size,
        });
    }
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let n = group.len() as f64;
        let mean = group.iter().map(|&r| r as f64).sum::<f64>() / n;
        let std = if group.len() > 1 {
            (group
                .iter()
                .map(|&r| (r as f64 - mean).powi(2))
                .sum::<f64>()
                / (n - 1.0))
                .sqrt()
        } else {
            0.0
        };
        out.extend(
            group
                .iter()
                .map(|&r| ((r as f64 - mean) / (std + 1e-4)) as f32),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/train/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn matches_python_fixture() {
        let specs: Vec<RewardSpec> = toml::from_str::<toml::Table>(
            r#"
            [[rewards]]
            kind = "correctness"
            [[rewards]]
            kind = "int"
            [[rewards]]
            kind = "strict_format"
            [[rewards]]
            kind = "soft_format"
            [[rewards]]
            kind = "xml_count"
            [[rewards]]
            kind = "regex"
            pattern = '\s*<reasoning>[^<]*\d'
            [[rewards]]
            kind = "exact_match"
            [[rewards]]
            kind = "length_penalty"
            max_chars = 80
            weight = 0.5
            "#,
        )
        .unwrap()["rewards"]
            .clone()
            .try_into()
            .unwrap();
        let set = RewardSet::new(&specs).unwrap();
        let keys = [
            "correctness",
            "int",
            "strict_format",
            "soft_format",
            "xml_count",
            "regex",
            "exact",
            "length",
        ];
        let text = fixture("rewards.jsonl");
        let mut rows = 0;
        for line in text.lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let completion = row["completion"].as_str().unwrap();
            let reference = row["reference"].as_str().unwrap();
            let (got, total) = set.score_total(completion, reference);
            let mut want_total = 0.0;
            for (i, key) in keys.iter().enumerate() {
                let want = row["scores"][key].as_f64().unwrap();
                want_total += want * specs[i].weight as f64;
                assert!(
                    (got[i] as f64 - want).abs() < 1e-6,
                    "{key} of {completion:?} / {reference:?}: got {}, want {want}",
                    got[i]
                );
            }
            assert!((total as f64 - want_total).abs() < 1e-5);
            rows += 1;
        }
        assert!(rows >= 30, "only {rows} fixture rows");
    }

    #[test]
    fn advantages_match_trl_formula() {
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&fixture("advantages.json")).unwrap();
        for case in cases {
            let rewards: Vec<f32> = serde_json::from_value(case["rewards"].clone()).unwrap();
            let group = case["group_size"].as_u64().unwrap() as usize;
            let want: Vec<f64> = serde_json::from_value(case["advantages"].clone()).unwrap();
            let got = group_advantages(&rewards, group).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-4 * w.abs().max(1.0),
                    "{rewards:?}: got {got:?}, want {want:?}"
                );
            }
        }
        let err = group_advantages(&[1.0, 2.0, 3.0], 2).unwrap_err();
        assert!(err.to_string().contains("groups of 2"), "{err}");
    }

    #[test]
    fn python_string_semantics() {
        assert!(py_isdigit("0123") && py_isdigit("\u{b2}") && py_isdigit("\u{1d7ce}"));
        assert!(
            !py_isdigit("") && !py_isdigit("\u{bd}") && !py_isdigit("1.5") && !py_isdigit("-1")
        );
        assert_eq!(py_strip("\u{1c} a b\u{3000}\n"), "a b");
        assert_eq!(extract_xml_answer("x<answer> 1 </answer>y<answer>2"), "2");
        assert_eq!(extract_hash_answer("steps\n#### 18"), "18");
    }

    #[test]
    fn gsm8k_preset_and_config_errors() {
        let set = RewardSet::gsm8k_r1();
        assert_eq!(
            set.names(),
            [
                "xml_count",
                "soft_format",
                "strict_format",
                "int",
                "correctness"
            ]
        );
        let good = "<reasoning>\nx\n</reasoning>\n<answer>\n3\n</answer>\n";
        let (scores, total) = set.score_total(good, "#### 3");
        assert_eq!(scores, [0.5, 0.0, 0.5, 0.5, 2.0]);
        assert_eq!(total, 3.5);
        let bad = [RewardSpec {
            kind: RewardKind::Regex {
                pattern: "(".into(),
            },
            weight: 1.0,
        }];
        let err = RewardSet::new(&bad).err().unwrap().to_string();
        assert!(err.contains("reward 0") && err.contains("\"(\""), "{err}");
        assert!(toml::from_str::<RewardSpec>("kind = \"bleu\"").is_err());
        let spec: RewardSpec = toml::from_str("kind = \"int\"").unwrap();
        assert_eq!(spec.weight, 1.0);
    }
}
