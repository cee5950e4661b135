//! Tests of the text module against transformers fixtures (scripts/make_template_fixtures.py) and
//! real data (/work/shared/data/medical).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::text::chat_template::{ChatMessage, ChatTemplate, SpecialTokens};
use crate::text::format::{format_row, PromptFormat, Record, Row};
use crate::text::stream::IncrementalDecoder;
use crate::text::tokenize::{tokenize_example, TemplateKind, TokenizeOptions, IGNORE_INDEX};
use crate::text::tokenizer::TextTokenizer;
use crate::text::train::train_byte_level_bpe;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/text");
/// The GBK medical CSV shipped in data/ (a slice of ../shared/data/medical, MIT).
const MEDICAL_CSV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/medical/样例_内科5000-6000.csv"
);
const TINY_VOCAB: usize = 800;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn read_json(name: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn tiny() -> TextTokenizer {
    TextTokenizer::from_dir(fixture("tiny_tokenizer")).unwrap()
}

fn train_tiny() -> TextTokenizer {
    let corpus = std::fs::read_to_string(fixture("tiny_corpus.txt")).unwrap();
    train_byte_level_bpe(corpus.split("\n\n\n"), TINY_VOCAB, &[]).unwrap()
}

#[test]
fn tiny_tokenizer_fixture_is_reproducible() {
    let first = train_tiny();
    let second = train_tiny();
    assert_eq!(
        first.fingerprint(),
        second.fingerprint(),
        "training is not deterministic within a process"
    );
    assert_eq!(first.vocab_size(), TINY_VOCAB);
    if std::env::var_os("RUNNER_REGEN_FIXTURES").is_some() {
        first.save(fixture("tiny_tokenizer")).unwrap();
        panic!("RUNNER_REGEN_FIXTURES: wrote tiny_tokenizer; rerun without it to compare");
    }
    let dir = tempfile::tempdir().unwrap();
    first.save(dir.path()).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let fresh = std::fs::read(dir.path().join(file)).unwrap();
        let committed = std::fs::read(fixture("tiny_tokenizer").join(file)).unwrap();
        assert!(
            fresh == committed,
            "{file}: retraining differs from the committed fixture (run-to-run nondeterminism?)"
        );
    }
    assert_eq!(
        tiny().fingerprint(),
        first.fingerprint(),
        "save/load changes the fingerprint"
    );
}

fn check_encode_cases(tok: &TextTokenizer, cases: &Json) {
    let ids = |v: &Json| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "encode {text:?}"
        );
        assert_eq!(
            tok.encode_plain(text).unwrap(),
            ids(&case["plain_ids"]),
            "encode_plain {text:?}"
        );
        let got = tok.encode(text).unwrap();
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
        assert_eq!(
            tok.decode(&got, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode skip {text:?}"
        );
    }
}

#[test]
fn encode_and_decode_match_transformers() {
    let tok = tiny();
    let cases = read_json("encode_cases.json");
    assert_eq!(tok.eos_id().map(u64::from), cases["eos_token_id"].as_u64());
    assert_eq!(tok.pad_id().map(u64::from), cases["pad_token_id"].as_u64());
    check_encode_cases(&tok, &cases["cases"]);
}

/// Llama-3 style BOS from a TemplateProcessing post-processor, checked against AutoTokenizer.
#[test]
fn bos_post_processor_matches_transformers() {
    let variant = read_json("encode_cases.json")["bos_variant"].clone();
    let dir = tempfile::tempdir().unwrap();
    let mut tj: Json = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny_tokenizer/tokenizer.json")).unwrap(),
    )
    .unwrap();
    tj["post_processor"] = variant["post_processor"].clone();
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    let mut cfg = read_json("tiny_tokenizer/tokenizer_config.json");
    cfg["bos_token"] = variant["bos_token"].clone();
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    check_encode_cases(&tok, &variant["cases"]);
    let bos = tok.bos_id().unwrap();
    assert_eq!(tok.special_affixes().unwrap(), (vec![bos], vec![]));
    // Plain formats get exactly one BOS in front of the prompt.
    let ex = tokenize_example(
        &tok,
        TemplateKind::Plain,
        &alpaca_record(),
        &TokenizeOptions {
            max_seq_len: 512,
            train_on_prompt: false,
            add_eos: true,
        },
    )
    .unwrap();
    assert_eq!(ex.input_ids[0], bos);
    assert_ne!(ex.input_ids[1], bos);
    assert_eq!(ex.labels[0], IGNORE_INDEX);
}

#[test]
fn chat_templates_match_transformers() {
    let cases = read_json("chat_template_cases.json");
    let sp = &cases["special_tokens"];
    let get = |k: &str| sp.get(k).and_then(Json::as_str).map(str::to_owned);
    let special = SpecialTokens {
        bos_token: get("bos_token"),
        eos_token: get("eos_token"),
        pad_token: get("pad_token"),
        unk_token: get("unk_token"),
    };
    let list = cases["cases"].as_array().unwrap();
    assert!(list.len() >= 18);
    for case in list {
        let file = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(fixture(file)).unwrap();
        let template = ChatTemplate::new(file, &source, special.clone()).unwrap();
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(Vec::as_slice);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = template.render_json(messages, tools, gen).unwrap();
        assert_eq!(
            got,
            case["expected"].as_str().unwrap(),
            "{file} / {} / gen={gen}",
            case["conversation"]
        );
    }
}

fn alpaca_record() -> Record {
    let row: Row = [
        ("instruction", "把这句话翻译成英文。"),
        ("input", "高血压患者能吃党参吗？"),
        (
            "output",
            "Can people with high blood pressure eat codonopsis?",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    format_row(&PromptFormat::alpaca(), &row).unwrap()
}

#[test]
fn alpaca_labels_mask_prompt_and_append_eos() {
    let tok = tiny();
    let rec = alpaca_record();
    let opts = TokenizeOptions {
        max_seq_len: 4096,
        train_on_prompt: false,
        add_eos: true,
    };
    let ex = tokenize_example(&tok, TemplateKind::Plain, &rec, &opts).unwrap();
    let prompt_len = tok.encode_plain(&rec.prompt).unwrap().len();
    let eos = tok.eos_id().unwrap();
    // Separate tokenization equals tokenizing the full text at this boundary.
    let mut full = tok
        .encode_plain(&format!("{}{}", rec.prompt, rec.response))
        .unwrap();
    full.push(eos);
    assert_eq!(ex.input_ids, full);
    assert_eq!(ex.length, ex.input_ids.len());
    assert!(ex.labels[..prompt_len].iter().all(|&l| l == IGNORE_INDEX));
    let kept: Vec<u32> = ex.labels[prompt_len..].iter().map(|&l| l as u32).collect();
    assert_eq!(kept, ex.input_ids[prompt_len..].to_vec());
    assert_eq!(*ex.input_ids.last().unwrap(), eos);
    assert_eq!(
        tok.decode(&kept, false).unwrap(),
        format!("{}<|im_end|>", rec.response)
    );

    let all = tokenize_example(
        &tok,
        TemplateKind::Plain,
        &rec,
        &TokenizeOptions {
            train_on_prompt: true,
            ..opts
        },
    )
    .unwrap();
    assert!(all
        .labels
        .iter()
        .zip(&all.input_ids)
        .all(|(&l, &id)| l == i64::from(id)));
}

#[test]
fn chat_labels_cover_only_assistant_turns() {
    let tok = tiny();
    let template = tok.chat_template(None).unwrap();
    let messages = vec![
        ChatMessage::new("system", "你是医生。"),
        ChatMessage::new("user", "Name a color."),
        ChatMessage::new("assistant", "Blue."),
        ChatMessage::new("user", "另一个？"),
        ChatMessage::new("assistant", "红色。"),
    ];
    let rec = Record {
        messages: Some(messages.clone()),
        ..Default::default()
    };
    let opts = TokenizeOptions {
        max_seq_len: 4096,
        train_on_prompt: false,
        add_eos: true,
    };
    let ex = tokenize_example(&tok, TemplateKind::Chat(&template), &rec, &opts).unwrap();
    let rendered = template.render(&messages, false).unwrap();
    assert_eq!(ex.input_ids, tok.encode_plain(&rendered).unwrap());
    let kept: Vec<u32> = ex
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(
        tok.decode(&kept, false).unwrap(),
        "Blue.<|im_end|>\n红色。<|im_end|>\n"
    );
    // The masked part of each turn ends with the generation prompt.
    let first_kept = ex.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
    let prompt_text = tok.decode(&ex.input_ids[..first_kept], false).unwrap();
    assert!(
        prompt_text.ends_with("<|im_start|>assistant\n"),
        "{prompt_text:?}"
    );
}

#[test]
fn truncation_keeps_prompt_head_and_cuts_response_tail() {
    let tok = tiny();
    let mut rec = alpaca_record();
    rec.response = "word ".repeat(200);
    let opts = TokenizeOptions {
        max_seq_len: 64,
        train_on_prompt: false,
        add_eos: true,
    };
    let ex = tokenize_example(&tok, TemplateKind::Plain, &rec, &opts).unwrap();
    assert_eq!(ex.length, 64);
    assert_eq!(ex.labels.len(), 64);
    let prompt = tok.encode_plain(&rec.prompt).unwrap();
    let (keep_prompt, keep_resp) = crate::text::tokenize::infer_seqlen(
        prompt.len(),
        tok.encode_plain(&rec.response).unwrap().len() + 1,
        64,
    );
    assert_eq!(keep_prompt + keep_resp, 64);
    assert_eq!(ex.input_ids[..keep_prompt], prompt[..keep_prompt]);
    assert!(ex.labels[..keep_prompt].iter().all(|&l| l == IGNORE_INDEX));
    assert!(ex.labels[keep_prompt..].iter().all(|&l| l != IGNORE_INDEX));
    assert_ne!(
        *ex.input_ids.last().unwrap(),
        tok.eos_id().unwrap(),
        "the cut tail includes the EOS"
    );
    let err = tokenize_example(
        &tok,
        TemplateKind::Plain,
        &rec,
        &TokenizeOptions {
            max_seq_len: 1,
            ..opts
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("max_seq_len"));
}

/// Reads the GBK medical CSV and returns its lines (header dropped) as UTF-8.
fn medical_lines() -> Vec<String> {
    let bytes = std::fs::read(MEDICAL_CSV).expect("data/medical CSV is part of the repository");
    let (text, _, had_errors) = encoding_rs::GBK.decode(&bytes);
    assert!(!had_errors, "medical CSV is not valid GBK");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn medical_tokenizer_round_trips_chinese_and_streams_whole_chars() {
    let lines = medical_lines();
    assert!(lines.len() > 500);
    let tok = train_byte_level_bpe(lines.iter().map(String::as_str), 3000, &[]).unwrap();
    for line in lines.iter().step_by(97) {
        let ids = tok.encode_plain(line).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), *line);
        assert!(
            ids.len() * 2 < line.len(),
            "BPE did not learn Chinese merges: {} ids for {} bytes",
            ids.len(),
            line.len()
        );
    }
    // Rare characters stay split over byte tokens: streaming must hold them back until complete.
    let text = "罕见字：龘靐齉爩，以及🙂。";
    let ids = tok.encode_plain(text).unwrap();
    let mut dec = IncrementalDecoder::new(false);
    let mut streamed = String::new();
    for &id in &ids {
        if let Some(piece) = dec.step(&tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "broken UTF-8 chunk {piece:?}");
            streamed.push_str(&piece);
        }
    }
    if let Some(rest) = dec.flush(&tok).unwrap() {
        streamed.push_str(&rest);
    }
    assert_eq!(streamed, text);
    assert!(
        ids.len() > text.chars().count(),
        "expected some characters split over byte tokens"
    );
}

#[test]
fn from_dir_reads_configs_and_llama_bos_policy() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny();
    std::fs::copy(
        fixture("tiny_tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = serde_json::json!({
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|endoftext|>",
        "add_bos_token": true,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656f64,
        "chat_template": [{"name": "default", "template": "{{ bos_token }}x"}, {"name": "tool_use", "template": "t"}],
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    let llama = TextTokenizer::from_dir(dir.path()).unwrap();
    let bos = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(llama.bos_id(), Some(bos));
    assert_eq!(
        llama.eos_ids(),
        vec![2, 0],
        "deduplicated, generation_config first"
    );
    assert_eq!(llama.model_max_length(), None);
    let plain = llama.encode_plain("Hello").unwrap();
    assert_eq!(llama.encode("Hello").unwrap(), [vec![bos], plain].concat());
    assert_eq!(llama.special_affixes().unwrap(), (vec![bos], vec![]));
    assert_eq!(
        llama.chat_template_names(),
        vec!["default".to_owned(), "tool_use".to_owned()]
    );
    assert_eq!(
        llama
            .chat_template(None)
            .unwrap()
            .render(&[], false)
            .unwrap(),
        "<|im_start|>x"
    );
    assert!(llama
        .chat_template(Some("rag"))
        .unwrap_err()
        .to_string()
        .contains("tool_use"));
    assert_ne!(llama.fingerprint(), tok.fingerprint());

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|nope|>"}"#,
    )
    .unwrap();
    let err = TextTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("<|nope|>") && err.contains("eos_token"),
        "{err}"
    );
}

#[test]
fn chat_template_jinja_beside_the_config_is_the_default_template() {
    // transformers >= 4.43 writes the template to chat_template.jinja, not tokenizer_config.json.
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/families/qwen3");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(format!("{fixture}/{f}"), dir.path().join(f)).unwrap();
    }
    let without = TextTokenizer::from_dir(dir.path()).unwrap();
    assert!(without.chat_template_names().is_empty());
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let with = TextTokenizer::from_dir(dir.path()).unwrap();
    let rendered = with
        .chat_template(None)
        .unwrap()
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            false,
        )
        .unwrap();
    assert_eq!(rendered, "<user>hi");
}
