//! Text decoding of input files: UTF-8 (with or without BOM), GBK and GB18030.
//!
//! `auto` treats a UTF-8 BOM or valid UTF-8 as UTF-8 and anything else as GB18030, the superset of
//! GBK, so GBK files and GB18030 files with characters outside GBK both decode. GB18030 gives
//! some character to most byte sequences, so `auto` first checks that the bytes look like Chinese
//! text (see [`looks_like_gbk`]): a Latin-1, Shift-JIS or UTF-16 file is an error asking for an
//! explicit `encoding`, not silent mojibake.

use super::DataError;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TextEncoding {
    #[default]
    Auto,
    #[serde(alias = "utf8")]
    Utf8,
    Gbk,
    Gb18030,
}

/// Decodes `bytes` read from `path`; returns the text and the encoding actually used.
pub fn decode(
    bytes: &[u8],
    encoding: TextEncoding,
    path: &Path,
) -> Result<(String, &'static str), DataError> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    match encoding {
        TextEncoding::Auto => {
            if let Some(rest) = bytes.strip_prefix(BOM) {
                return utf8(rest, path).map(|s| (s, "utf-8"));
            }
            match std::str::from_utf8(bytes) {
                Ok(s) => Ok((s.to_string(), "utf-8")),
                Err(e) => {
                    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
                        return Err(DataError::InFile {
                            path: path.to_path_buf(),
                            message: "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8".into(),
                        });
                    }
                    if let Err(share) = looks_like_gbk(bytes) {
                        let offset = e.valid_up_to();
                        return Err(DataError::AtLine {
                            path: path.to_path_buf(),
                            line: line_of(bytes, offset),
                            message: format!(
                                "not UTF-8 (byte {offset}), and not like GBK/GB18030 Chinese text either: only {:.0}% of its multi-byte characters are common Chinese characters or punctuation; set `encoding` (\"gbk\", \"gb18030\" or \"utf-8\") if you know it, or convert the file to UTF-8",
                                share * 100.0
                            ),
                        });
                    }
                    strict(bytes, encoding_rs::GB18030, path).map(|s| (s, "gb18030"))
                }
            }
        }
        TextEncoding::Utf8 => {
            utf8(bytes.strip_prefix(BOM).unwrap_or(bytes), path).map(|s| (s, "utf-8"))
        }
        TextEncoding::Gbk => strict(bytes, encoding_rs::GBK, path).map(|s| (s, "gbk")),
        TextEncoding::Gb18030 => strict(bytes, encoding_rs::GB18030, path).map(|s| (s, "gb18030")),
    }
}

/// Whether non-UTF-8 `bytes` look like GBK/GB18030 Chinese text: at least half of their
/// multi-byte characters lie in GB2312's area (both bytes 0xA1..=0xFE: the 6,763 common hanzi,
/// full-width punctuation and symbols), as in real Chinese text, where the rest of GBK holds rare
/// and traditional characters. Single-byte encodings misread as GBK pair a high byte with an
/// ASCII letter or space (outside that area); so does most Shift-JIS. Err holds the share found.
pub fn looks_like_gbk(bytes: &[u8]) -> Result<(), f64> {
    let (mut multi, mut common) = (0usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        let lead = bytes[i];
        if lead < 0x80 {
            i += 1;
            continue;
        }
        let trail = bytes.get(i + 1).copied().unwrap_or(0);
        multi += 1;
        if (0x30..=0x39).contains(&trail) {
            // A GB18030 four-byte sequence: characters beyond GBK, rare in real text.
            i += 4;
            continue;
        }
        if (0xA1..=0xF7).contains(&lead) && (0xA1..=0xFE).contains(&trail) {
            common += 1;
        }
        i += 2;
    }
    let share = if multi == 0 {
        1.0
    } else {
        common as f64 / multi as f64
    };
    if share >= 0.5 {
        Ok(())
    } else {
        Err(share)
    }
}

fn utf8(bytes: &[u8], path: &Path) -> Result<String, DataError> {
    std::str::from_utf8(bytes).map(str::to_string).map_err(|e| {
        let offset = e.valid_up_to();
        DataError::AtLine {
            path: path.to_path_buf(),
            line: line_of(bytes, offset),
            message: format!(
                "invalid UTF-8 at byte {offset}; set `encoding = \"gbk\"` or \"gb18030\" if the file is Chinese-encoded"
            ),
        }
    })
}

/// Decodes without replacement characters, so a wrong encoding is an error, not silent mojibake.
fn strict(
    bytes: &[u8],
    encoding: &'static encoding_rs::Encoding,
    path: &Path,
) -> Result<String, DataError> {
    let mut decoder = encoding.new_decoder_without_bom_handling();
    let capacity = decoder
        .max_utf8_buffer_length_without_replacement(bytes.len())
        .unwrap_or(bytes.len() * 3);
    let mut out = String::with_capacity(capacity);
    let (result, read) = decoder.decode_to_string_without_replacement(bytes, &mut out, true);
    match result {
        encoding_rs::DecoderResult::InputEmpty => Ok(out),
        encoding_rs::DecoderResult::Malformed(bad, _) => {
            let offset = read.saturating_sub(bad as usize);
            Err(DataError::AtLine {
                path: path.to_path_buf(),
                line: line_of(bytes, offset),
                message: format!("byte {offset} is not valid {}", encoding.name()),
            })
        }
        encoding_rs::DecoderResult::OutputFull => Err(DataError::InFile {
            path: path.to_path_buf(),
            message: "decoder output buffer too small".into(),
        }),
    }
}

fn line_of(bytes: &[u8], offset: usize) -> usize {
    bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_detects_each_encoding() {
        let p = Path::new("x.csv");
        let text = "问题,回答\n高血压怎么办,多运动\n";
        let (gbk, _, _) = encoding_rs::GBK.encode(text);
        assert_eq!(decode(&gbk, TextEncoding::Auto, p).unwrap().0, text);
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(text.as_bytes());
        assert_eq!(
            decode(&bom, TextEncoding::Auto, p).unwrap(),
            (text.to_string(), "utf-8")
        );
        // U+20000 is outside GBK: GB18030 encodes it in four bytes.
        let rare = "𠀀字";
        let (gb, _, _) = encoding_rs::GB18030.encode(rare);
        assert_eq!(decode(&gb, TextEncoding::Auto, p).unwrap().0, rare);
    }

    #[test]
    fn auto_refuses_text_that_is_not_chinese() {
        let p = Path::new("notes.csv");
        // Latin-1 French: é before a letter is a valid GBK pair, so GB18030 decoding "worked"
        // and gave mojibake.
        let (latin1, _, _) = encoding_rs::WINDOWS_1252.encode("q,a\ncafés,thés\nétés,désolés\n");
        let err = decode(&latin1, TextEncoding::Auto, p)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("notes.csv:2: not UTF-8"), "{err}");
        assert!(err.contains("set `encoding`"), "{err}");
        // Shift-JIS Japanese.
        let (sjis, _, _) =
            encoding_rs::SHIFT_JIS.encode("質問,回答\nこんにちは,ありがとうございます\n");
        let err = decode(&sjis, TextEncoding::Auto, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not like GBK/GB18030"), "{err}");
        // UTF-16 with its byte-order mark.
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend("q,a\n".encode_utf16().flat_map(u16::to_le_bytes));
        let err = decode(&utf16, TextEncoding::Auto, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("UTF-16"), "{err}");
        // Decoded as asked for, the same bytes are valid GB18030 (mojibake), which is why `auto`
        // must not take them as it.
        assert!(decode(&latin1, TextEncoding::Gb18030, p).is_ok());
    }

    #[test]
    fn auto_keeps_reading_chinese_text_with_rare_characters() {
        let p = Path::new("x.csv");
        // Mostly common hanzi with some GBK-only and GB18030-only characters.
        let text = "问题,回答\n头痛怎么办,多休息，喝水。\n𠀀字很少见,但是也要能读\n";
        let (gb, _, _) = encoding_rs::GB18030.encode(text);
        assert_eq!(decode(&gb, TextEncoding::Auto, p).unwrap().0, text);
        // The GBK medical dialogues the main recipe reads.
        let medical = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/medical");
        let csv = medical.join("样例_内科5000-6000.csv");
        let bytes = std::fs::read(&csv).unwrap();
        assert!(std::str::from_utf8(&bytes).is_err(), "the sample is GBK");
        assert_eq!(
            decode(&bytes, TextEncoding::Auto, &csv).unwrap().1,
            "gb18030"
        );
    }

    #[test]
    fn invalid_utf8_names_line() {
        let err = decode(b"a\nb\n\xff\n", TextEncoding::Utf8, Path::new("f.csv")).unwrap_err();
        assert!(err.to_string().starts_with("f.csv:3:"), "{err}");
    }
}
