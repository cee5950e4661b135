//! A chat template's text (and, after a NUL byte, the messages as JSON) through runner's
//! minijinja renderer: compiling and rendering must end, with text or an error, never a panic or
//! a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runner::text::chat_template::{ChatTemplate, SpecialTokens};
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let (template, messages) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(template) = std::str::from_utf8(template) else {
        return;
    };
    let messages: Vec<Value> = messages
        .and_then(|m| serde_json::from_slice(m).ok())
        .unwrap_or_else(|| {
            vec![
                json!({"role": "system", "content": "You are helpful."}),
                json!({"role": "user", "content": "Hi <b> \"there\"\n"}),
                json!({"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": {"x": 1.5}}}
                ]}),
                json!({"role": "tool", "content": "42"}),
            ]
        });
    let special = SpecialTokens {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        pad_token: None,
        unk_token: Some("<unk>".into()),
    };
    let Ok(t) = ChatTemplate::new("fuzz", template, special) else {
        return;
    };
    let tools = [json!({"type": "function", "function": {"name": "f", "parameters": {}}})];
    for add_generation_prompt in [false, true] {
        let _ = t.render_json(&messages, Some(&tools), add_generation_prompt);
    }
});
