//! Text decoding of input files: UTF-8 (with or without BOM), GBK and GB18030.
//!
//! `auto` treats a UTF-8 BOM or valid UTF-8 as UTF-8 and anything else as GB18030, the superset of
//! GBK, so GBK files and GB18030 files with characters outside GBK both decode.

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
                Err(_) => strict(bytes, encoding_rs::GB18030, path).map(|s| (s, "gb18030")),
            }
        }
        TextEncoding::Utf8 => {
            utf8(bytes.strip_prefix(BOM).unwrap_or(bytes), path).map(|s| (s, "utf-8"))
        }
        TextEncoding::Gbk => strict(bytes, encoding_rs::GBK, path).map(|s| (s, "gbk")),
        TextEncoding::Gb18030 => strict(bytes, encoding_rs::GB18030, path).map(|s| (s, "gb18030")),
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
    fn invalid_utf8_names_line() {
        let err = decode(b"a\nb\n\xff\n", TextEncoding::Utf8, Path::new("f.csv")).unwrap_err();
        assert!(err.to_string().starts_with("f.csv:3:"), "{err}");
    }
}
