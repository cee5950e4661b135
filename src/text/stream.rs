//! Streaming-safe incremental decoding for generation: text comes out only once it is complete
//! UTF-8. Reference: text-generation-inference `decode_token`, tokenizers `DecodeStream`.

use crate::text::tokenizer::TextTokenizer;
use crate::text::{Error, Result};

/// Streaming decode for generation: emits text only once it is complete UTF-8, so a multi-byte
/// character split over several byte-level tokens never comes out as U+FFFD. Same algorithm as
/// TGI / tokenizers' `DecodeStream` (decode a small window, emit the new suffix).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Default::default()
        }
    }

    /// Adds one generated id; returns the newly completed text, if any.
    pub fn step(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let raw = |ids: &[u32]| {
            tok.inner()
                .decode(ids, self.skip_special_tokens)
                .map_err(|e| Error::Tokenizer {
                    op: "decode",
                    message: e.to_string(),
                })
        };
        let prefix = raw(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = raw(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let new = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of generation (lossy: an incomplete char becomes U+FFFD).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<Option<String>> {
        let prefix = tok
            .inner()
            .decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special_tokens,
            )
            .map_err(|e| Error::Tokenizer {
                op: "decode",
                message: e.to_string(),
            })?;
        let full = tok
            .inner()
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                op: "decode",
                message: e.to_string(),
            })?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full
            .get(prefix.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_owned))
    }
}
