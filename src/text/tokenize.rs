//! Records -> token ids with response-only labels, truncation and packing.
//! Reference: LLaMA-Factory `data/processor/supervised.py` (`_encode_supervised_example`,
//! `infer_seqlen` in `processor_utils.py`, packing with `neat_packing`).
//!
//! Prompt and response are tokenized separately and concatenated, as LLaMA-Factory does: the
//! prompt ids are then exactly what the model sees at inference (encode(prompt), then generate),
//! and the label boundary needs no offset bookkeeping. All boundaries fall on special tokens or
//! after "\n" ("### Response:\n", "<|im_start|>assistant\n"), where the Qwen2/Llama-3 split regex
//! already cuts, so the concatenation equals tokenizing the full text (checked in tests).
//!
//! Labels are aligned with input_ids (label[i] = input_ids[i] or -100); the model shifts.

use crate::text::chat_template::{ChatMessage, ChatTemplate};
use crate::text::format::Record;
use crate::text::tokenizer::TextTokenizer;
use crate::text::{Error, Result};

/// Label of tokens that carry no loss (PyTorch's CrossEntropyLoss ignore_index).
pub const IGNORE_INDEX: i64 = -100;

/// How a record becomes text.
#[derive(Clone, Copy)]
pub enum TemplateKind<'a> {
    /// prompt + response as written (alpaca, chatglm, custom); the tokenizer's BOS policy applies.
    Plain,
    /// Rendered with a chat template (`record.messages`, or system/prompt/response as one turn);
    /// loss on every assistant turn.
    Chat(&'a ChatTemplate),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeOptions {
    pub max_seq_len: usize,
    /// Keep loss on prompt tokens too.
    pub train_on_prompt: bool,
    /// Append the tokenizer's EOS after the response (chat: only if the assistant turn has no EOS).
    pub add_eos: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub length: usize,
}

/// LLaMA-Factory's `infer_seqlen`: how many source/target tokens to keep within `cutoff`.
pub fn infer_seqlen(source_len: usize, target_len: usize, cutoff: usize) -> (usize, usize) {
    let max_target = if target_len * 2 < cutoff {
        cutoff
    } else if source_len * 2 < cutoff {
        cutoff - source_len
    } else {
        (cutoff as f64 * (target_len as f64 / (source_len + target_len) as f64)) as usize
    };
    let new_target = max_target.min(target_len);
    let new_source = cutoff.saturating_sub(new_target).min(source_len);
    (new_source, new_target)
}

/// Tokenizes one record. Each (prompt, response) pair is truncated with `infer_seqlen` against
/// the budget left (prompt head and response head kept, tails cut), turns that no longer fit are
/// dropped, as LLaMA-Factory does.
pub fn tokenize_example(
    tok: &TextTokenizer,
    kind: TemplateKind<'_>,
    record: &Record,
    opts: &TokenizeOptions,
) -> Result<TokenizedExample> {
    if opts.max_seq_len < 2 {
        return Err(Error::BadMaxSeqLen {
            got: opts.max_seq_len,
        });
    }
    let pairs = match kind {
        TemplateKind::Plain => plain_pairs(tok, record, opts)?,
        TemplateKind::Chat(template) => chat_pairs(tok, template, record, opts)?,
    };
    let mut input_ids = vec![];
    let mut labels = vec![];
    for (source, target) in pairs {
        if input_ids.len() >= opts.max_seq_len {
            break;
        }
        let (s, t) = infer_seqlen(
            source.len(),
            target.len(),
            opts.max_seq_len - input_ids.len(),
        );
        input_ids.extend_from_slice(&source[..s]);
        if opts.train_on_prompt {
            labels.extend(source[..s].iter().map(|&id| i64::from(id)));
        } else {
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, s));
        }
        input_ids.extend_from_slice(&target[..t]);
        labels.extend(target[..t].iter().map(|&id| i64::from(id)));
    }
    let length = input_ids.len();
    Ok(TokenizedExample {
        input_ids,
        labels,
        length,
    })
}

/// A preference pair's rows: the prompt, shared by both, then the chosen response (`record`'s)
/// or the `rejected` one. Labels cover the responses only. Truncation follows TRL's DPO: the
/// prompt keeps its last `max_prompt_length` tokens; when prompt and the longer response still
/// exceed `max_seq_len`, `infer_seqlen` splits that budget, the prompt keeping its end and both
/// responses their start. Chat records have the rejected text in place of the last assistant
/// turn; earlier turns are part of the prompt.
pub fn tokenize_pair(
    tok: &TextTokenizer,
    kind: TemplateKind<'_>,
    record: &Record,
    rejected: &str,
    opts: &TokenizeOptions,
    max_prompt_length: Option<usize>,
) -> Result<(TokenizedExample, TokenizedExample)> {
    let mut other = record.clone();
    other.response = rejected.to_string();
    if let Some(messages) = &mut other.messages {
        match messages.iter_mut().rev().find(|m| m.role == "assistant") {
            Some(last) => last.content = rejected.to_string(),
            None => {
                return Err(Error::MissingRecordField {
                    kind: "chat".into(),
                    what: "assistant message",
                })
            }
        }
    }
    let split = |r: &Record| -> Result<(Vec<u32>, Vec<u32>)> {
        let pairs = match kind {
            TemplateKind::Plain => plain_pairs(tok, r, opts)?,
            TemplateKind::Chat(template) => chat_pairs(tok, template, r, opts)?,
        };
        let last = pairs.len() - 1;
        let mut prompt = Vec::new();
        let mut response = Vec::new();
        for (i, (source, target)) in pairs.into_iter().enumerate() {
            prompt.extend(source);
            if i == last {
                response = target;
            } else {
                prompt.extend(target);
            }
        }
        Ok((prompt, response))
    };
    let (mut prompt, chosen) = split(record)?;
    let (other_prompt, rejected) = split(&other)?;
    if other_prompt != prompt {
        return Err(Error::PairPromptsDiffer);
    }
    if let Some(keep) = max_prompt_length {
        prompt.drain(..prompt.len().saturating_sub(keep));
    }
    let longer = chosen.len().max(rejected.len());
    let (s, t) = infer_seqlen(prompt.len(), longer, opts.max_seq_len);
    prompt.drain(..prompt.len() - s);
    let row = |response: &[u32]| {
        let response = &response[..t.min(response.len())];
        let mut input_ids = prompt.clone();
        input_ids.extend_from_slice(response);
        let mut labels = vec![IGNORE_INDEX; prompt.len()];
        labels.extend(response.iter().map(|&id| i64::from(id)));
        let length = input_ids.len();
        TokenizedExample {
            input_ids,
            labels,
            length,
        }
    };
    Ok((row(&chosen), row(&rejected)))
}

fn plain_pairs(
    tok: &TextTokenizer,
    record: &Record,
    opts: &TokenizeOptions,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let (bos_prefix, _) = tok.special_affixes()?;
    let mut source = bos_prefix;
    source.extend(tok.encode_plain(&record.prompt)?);
    let mut target = tok.encode_plain(&record.response)?;
    if opts.add_eos {
        target.extend(tok.eos_id());
    }
    Ok(vec![(source, target)])
}

fn chat_pairs(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    record: &Record,
    opts: &TokenizeOptions,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let messages = match &record.messages {
        Some(m) => m.clone(),
        None => {
            let mut m = vec![];
            if let Some(s) = &record.system {
                m.push(ChatMessage::new("system", s.clone()));
            }
            m.push(ChatMessage::new("user", record.prompt.clone()));
            m.push(ChatMessage::new("assistant", record.response.clone()));
            m
        }
    };
    let eos_ids = tok.eos_ids();
    let mut pairs = vec![];
    let mut done = 0; // bytes of the rendered conversation already assigned to pairs
    let mut done_text = String::new();
    for (i, msg) in messages.iter().enumerate() {
        if msg.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let after = template.render(&messages[..=i], false)?;
        if !before.starts_with(&done_text) {
            return Err(Error::TemplateNotIncremental { turns: i });
        }
        if !after.starts_with(&before) {
            return Err(Error::TemplateNotIncremental { turns: i + 1 });
        }
        // Template-level BOS (e.g. "{{ bos_token }}") is part of the text; HF tokenizes chat
        // output with add_special_tokens=False, so do we.
        let source = tok.encode_plain(&before[done..])?;
        let mut target = tok.encode_plain(&after[before.len()..])?;
        if opts.add_eos && !target.iter().any(|id| eos_ids.contains(id)) {
            target.extend(tok.eos_id());
        }
        pairs.push((source, target));
        done = after.len();
        done_text = after;
    }
    if pairs.is_empty() {
        return Err(Error::MissingRecordField {
            kind: "chat".into(),
            what: "assistant message",
        });
    }
    Ok(pairs)
}

/// Several examples in one sequence of at most `max_seq_len` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSequence {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Restart at 0 at each example, so RoPE positions match unpacked training.
    pub position_ids: Vec<u32>,
    /// Length of each example, in order: the model builds a block-diagonal causal mask from these.
    /// Without that mask attention crosses examples (LLaMA-Factory's `packing` without
    /// `neat_packing`); the loss never does, see `pack_examples`.
    pub seq_lens: Vec<usize>,
}

/// Greedy first-fit packing in input order (deterministic). The first label of every example is
/// set to -100 so no example is trained to predict its start from the previous one's end.
/// Examples longer than `max_seq_len` (not produced by `tokenize_example`) get a sequence of
/// their own, cut to `max_seq_len`.
pub fn pack_examples(examples: &[TokenizedExample], max_seq_len: usize) -> Vec<PackedSequence> {
    let mut bins: Vec<PackedSequence> = vec![];
    for ex in examples.iter().filter(|e| e.length > 0) {
        let len = ex.length.min(max_seq_len);
        let slot = bins
            .iter()
            .position(|b| b.input_ids.len() + len <= max_seq_len);
        let bin = match slot {
            Some(i) => &mut bins[i],
            None => {
                bins.push(PackedSequence {
                    input_ids: vec![],
                    labels: vec![],
                    position_ids: vec![],
                    seq_lens: vec![],
                });
                let last = bins.len() - 1;
                &mut bins[last]
            }
        };
        bin.input_ids.extend_from_slice(&ex.input_ids[..len]);
        bin.labels.push(IGNORE_INDEX);
        bin.labels.extend_from_slice(&ex.labels[1..len]);
        bin.position_ids.extend(0..len as u32);
        bin.seq_lens.push(len);
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_seqlen_matches_llama_factory() {
        // Values computed with LLaMA-Factory's Python infer_seqlen.
        assert_eq!(infer_seqlen(10, 10, 100), (10, 10));
        assert_eq!(infer_seqlen(300, 20, 100), (80, 20));
        assert_eq!(infer_seqlen(20, 300, 100), (20, 80));
        assert_eq!(infer_seqlen(300, 100, 100), (75, 25));
        assert_eq!(infer_seqlen(5, 5, 0), (0, 0));
    }

    #[test]
    fn packing_resets_positions_and_masks_boundaries() {
        let ex = |ids: &[u32], labels: &[i64]| TokenizedExample {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            length: ids.len(),
        };
        let packed = pack_examples(
            &[
                ex(&[1, 2, 3], &[1, 2, 3]),
                ex(&[4, 5, 6, 7], &[-100, 5, 6, 7]),
                ex(&[8, 9], &[8, 9]),
            ],
            6,
        );
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[0].input_ids, vec![1, 2, 3, 8, 9]);
        assert_eq!(packed[0].labels, vec![-100, 2, 3, -100, 9]);
        assert_eq!(packed[0].position_ids, vec![0, 1, 2, 0, 1]);
        assert_eq!(packed[0].seq_lens, vec![3, 2]);
        assert_eq!(packed[1].input_ids, vec![4, 5, 6, 7]);
    }
}
