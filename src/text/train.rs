//! `init:tiny` tokenizer: a byte-level BPE trained with the tokenizers crate's BpeTrainer, laid out
//! like Qwen2's tokenizer.json (NFC normalizer, Qwen2 split regex + ByteLevel pre-tokenizer,
//! ByteLevel decoder/post-processor), with ChatML special tokens and chat template.
//! Reference: Qwen2 `tokenizer.json`, tokenizers `models/bpe/trainer.rs`.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::text::tokenizer::{TextTokenizer, TokenizerConfig};
use crate::text::{Error, Result};

/// Qwen2's pre-tokenizer split regex (GPT-4 style with single digits).
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ChatML without a default system prompt.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The special tokens every `init:tiny` tokenizer has, with these ids.
pub const CHATML_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Trains a byte-level BPE of `vocab_size` entries (256 byte symbols + merges + special tokens).
/// `special_tokens` are added after the three ChatML ones. The result only depends on the
/// multiset of texts' pre-tokenized words, not on thread scheduling (checked in tests).
pub fn train_byte_level_bpe<'a>(
    texts: impl Iterator<Item = &'a str>,
    vocab_size: usize,
    special_tokens: &[&str],
) -> Result<TextTokenizer> {
    let mut specials: Vec<String> = CHATML_SPECIAL_TOKENS
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in special_tokens {
        if !specials.iter().any(|x| x == s) {
            specials.push(s.to_string());
        }
    }
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let min_vocab = 256 + added.len();
    if vocab_size < min_vocab {
        return Err(Error::Train {
            message: format!(
                "vocab_size {vocab_size} is below the {min_vocab} byte and special symbols"
            ),
        });
    }
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(added)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);

    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| Error::Train {
        message: format!("split regex: {e}"),
    })?;
    let byte_level = ByteLevel::new(false, false, false);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])))
        .with_decoder(Some(ByteLevelDecoder::new(false, false, false)))
        .with_post_processor(Some(ByteLevel::new(false, false, false)));
    let texts: Vec<String> = texts.map(str::to_owned).collect();
    tokenizer
        .train(&mut trainer, texts.into_iter())
        .map_err(|e| Error::Train {
            message: e.to_string(),
        })?;

    let config = TokenizerConfig {
        chat_templates: [("default".to_owned(), CHATML_TEMPLATE.to_owned())].into(),
        eos_token: Some("<|im_end|>".into()),
        pad_token: Some("<|endoftext|>".into()),
        add_bos_token: Some(false),
        add_eos_token: Some(false),
        tokenizer_class: Some("PreTrainedTokenizerFast".into()),
        ..Default::default()
    };
    TextTokenizer::from_parts(tokenizer, config, vec![])
}
