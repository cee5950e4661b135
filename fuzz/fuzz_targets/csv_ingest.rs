//! A data file's bytes through runner's text readers: encoding detection and strict decoding
//! (UTF-8 with or without BOM, GBK, GB18030), then CSV (or JSON/JSONL) into a table. The first
//! byte picks the format, the encoding, the bad-row policy and the delimiter.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use runner::data::readers::{read_text_bytes, BadRows, FileFormat};
use runner::data::TextEncoding;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let format = match mode & 0b11 {
        0 | 1 => FileFormat::Csv,
        2 => FileFormat::Json,
        _ => FileFormat::Jsonl,
    };
    let encoding = match (mode >> 2) & 0b11 {
        0 => TextEncoding::Auto,
        1 => TextEncoding::Utf8,
        2 => TextEncoding::Gbk,
        _ => TextEncoding::Gb18030,
    };
    let bad_rows = if mode & 0b1_0000 == 0 {
        BadRows::Error
    } else {
        BadRows::Skip
    };
    let delimiter = [b',', b'\t', b';', b'|'][usize::from(mode >> 5) & 0b11];
    match read_text_bytes(
        bytes,
        Path::new("fuzz.csv"),
        format,
        encoding,
        bad_rows,
        delimiter,
    ) {
        Ok(report) => {
            for row in &report.table.rows {
                assert_eq!(row.len(), report.table.columns.len());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
