//! Ollama `Modelfile` beside an exported GGUF: FROM, TEMPLATE translated from a ChatML or
//! Llama-3 style Jinja chat template (others are quoted in a comment), SYSTEM from the
//! template's default system prompt, PARAMETER stop per end-of-turn token.
//! Reference: ollama docs/modelfile.md and docs/template.md.

use crate::gguf::tokenizer::GgufTokenizer;

const CHATML_TEMPLATE: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
const LLAMA3_TEMPLATE: &str = "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n";

/// A template's built-in system prompt (`<|im_start|>system\n...<|im_end|>` as a string literal).
fn default_system(template: &str) -> Option<String> {
    let start = template
        .find("<|im_start|>system\\n")
        .map(|i| i + "<|im_start|>system\\n".len())
        .or_else(|| {
            template
                .find("<|im_start|>system\n")
                .map(|i| i + "<|im_start|>system\n".len())
        })?;
    let rest = &template[start..];
    let end = rest.find("<|im_end|>")?;
    let text = &rest[..end];
    // Only a literal: a Jinja expression inside means the prompt is built at run time.
    (!text.contains("{{") && !text.contains("{%") && !text.contains('\'') && !text.is_empty())
        .then(|| text.replace("\\n", "\n"))
}

fn quote(s: &str) -> String {
    format!("\"\"\"{}\"\"\"", s.replace("\"\"\"", "\\\"\\\"\\\""))
}

/// The Modelfile text for `gguf_file_name` (a name in the same folder).
pub fn modelfile(gguf_file_name: &str, tok: &GgufTokenizer) -> String {
    let mut out = format!("FROM ./{gguf_file_name}\n");
    match tok.chat_template.as_deref() {
        Some(t) if t.contains("<|im_start|>") && t.contains("<|im_end|>") => {
            out.push_str(&format!("TEMPLATE {}\n", quote(CHATML_TEMPLATE)));
            if let Some(sys) = default_system(t) {
                out.push_str(&format!("SYSTEM {}\n", quote(&sys)));
            }
        }
        Some(t) if t.contains("<|start_header_id|>") && t.contains("<|eot_id|>") => {
            out.push_str(&format!("TEMPLATE {}\n", quote(LLAMA3_TEMPLATE)));
        }
        Some(t) => {
            out.push_str(
                "# The chat template is not ChatML or Llama 3; Ollama will use the raw prompt.\n",
            );
            out.push_str("# Original Jinja template (translate by hand):\n");
            for line in t.lines() {
                out.push_str(&format!("#   {line}\n"));
            }
        }
        None => {
            out.push_str("# No chat template in the tokenizer; Ollama will use the raw prompt.\n")
        }
    }
    for stop in tok.stop_tokens() {
        out.push_str(&format!(
            "PARAMETER stop {}\n",
            serde_json::Value::String(stop)
        ));
    }
    out
}
