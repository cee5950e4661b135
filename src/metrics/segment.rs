//! Word segmentation as Python jieba 0.42.1 does it (`jieba.cut(text)`: accurate mode, HMM on),
//! built on jieba-rs 0.11 plus two corrections for the places where they differ (found with
//! scripts/bench_score.py --jieba-diff and the ChatGLM fixture):
//!
//! 1. Python's `re_han_default` is `[\u4E00-\u9FD5a-zA-Z0-9+#&._%-]`; jieba-rs also counts
//!    U+9FD6..U+9FFF and the CJK extension/compatibility blocks (e.g. U+3400.., U+20000..) as
//!    Han. Python emits each such character as a token of its own, so they are split off first.
//! 2. For runs the HMM sees, Python's finalseg splits non-Han text with
//!    `[a-zA-Z0-9]+(?:\.\d+)?%?`, jieba-rs with `[a-zA-Z0-9]+(?:[._-][a-zA-Z0-9]+)*%?`:
//!    "100-200" is "100 - 200" in Python and one token in jieba-rs, "88.5cm" is "88.5 cm" vs one.
//!    The jieba dictionary has no ASCII words, so such ASCII tokens are re-split the Python way.

use std::sync::OnceLock;

use regex::Regex;

/// The process-wide jieba segmenter; building it parses the 350k-word dictionary.
pub fn jieba() -> &'static jieba_rs::Jieba {
    static JIEBA: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    JIEBA.get_or_init(jieba_rs::Jieba::new)
}

/// Characters jieba-rs treats as Han but Python jieba's `re_han_default` does not.
fn is_rust_only_han(c: char) -> bool {
    matches!(c,
        '\u{3400}'..='\u{4DBF}'
        | '\u{9FD6}'..='\u{9FFF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2A6DF}'
        | '\u{2A700}'..='\u{2EBEF}'
        | '\u{2F800}'..='\u{2FA1F}'
    )
}

/// `list(jieba.cut(text))` of Python jieba 0.42.1.
pub fn cut_like_python(text: &str) -> Vec<&str> {
    let mut words = Vec::with_capacity(text.len() / 3 + 1);
    let mut start = 0;
    for (at, c) in text.char_indices() {
        if is_rust_only_han(c) {
            cut_piece(&text[start..at], &mut words);
            words.push(&text[at..at + c.len_utf8()]);
            start = at + c.len_utf8();
        }
    }
    cut_piece(&text[start..], &mut words);
    words
}

fn cut_piece<'a>(piece: &'a str, words: &mut Vec<&'a str>) {
    if piece.is_empty() {
        return;
    }
    for token in jieba().cut(piece, true) {
        let word = token.word;
        if word.len() > 1
            && word.bytes().any(|b| matches!(b, b'.' | b'-' | b'_'))
            && word.is_ascii()
        {
            split_like_finalseg(word, words);
        } else {
            words.push(word);
        }
    }
}

/// Python finalseg's `re_skip.split(blk)`: matches and the gaps between them, empty ones dropped.
fn split_like_finalseg<'a>(word: &'a str, words: &mut Vec<&'a str>) {
    static SKIP: OnceLock<Regex> = OnceLock::new();
    let skip =
        SKIP.get_or_init(|| Regex::new(r"[a-zA-Z0-9]+(?:\.[0-9]+)?%?").expect("constant regex"));
    let mut last = 0;
    for m in skip.find_iter(word) {
        if m.start() > last {
            words.push(&word[last..m.start()]);
        }
        words.push(m.as_str());
        last = m.end();
    }
    if last < word.len() {
        words.push(&word[last..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_jieba_on_known_differences() {
        // Expected token lists from Python jieba 0.42.1.
        let cases: [(&str, &[&str]); 4] = [
            (
                "2019年新款 100-200元，裙长88.5cm。",
                &[
                    "2019", "年", "新款", " ", "100", "-", "200", "元", "，", "裙长", "88.5", "cm",
                    "。",
                ],
            ),
            (
                "𠀀𠀁這款裙子很好看鿕鿖",
                &["𠀀", "𠀁", "這款", "裙子", "很", "好看", "鿕", "鿖"],
            ),
            (
                "腰围68cm，3.5%的v1.2.3",
                &["腰围", "68cm", "，", "3.5%", "的", "v1.2", ".", "3"],
            ),
            ("a_b-c", &["a", "_", "b", "-", "c"]),
        ];
        for (text, expected) in cases {
            assert_eq!(cut_like_python(text), expected, "{text}");
        }
    }
}
