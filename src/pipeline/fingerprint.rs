//! Fingerprints: blake3 over a canonical JSON document of everything that determines an artifact.

use serde_json::{Map, Value};

/// Recursively sorts object keys so equal documents serialize to equal bytes.
pub fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&map[k]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

pub fn fingerprint(doc: &Value) -> String {
    let bytes = serde_json::to_vec(&canonical(doc)).unwrap_or_default();
    blake3::hash(&bytes).to_hex().to_string()
}

/// Human-readable differences between two fingerprint documents, as dotted keys.
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into("", old, new, &mut out);
    out
}

fn diff_into(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_into(&child, x, y, out),
                    (None, Some(y)) => out.push(format!("{child} added ({y})")),
                    (Some(x), None) => out.push(format!("{child} removed (was {x})")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_matter() {
        let a = json!({"b": 1, "a": {"y": 2, "x": [1, 2]}});
        let b = json!({"a": {"x": [1, 2], "y": 2}, "b": 1});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&json!({"b": 2})));
    }

    #[test]
    fn diff_names_changed_keys() {
        let d = diff(
            &json!({"params": {"encoding": "auto", "x": 1}}),
            &json!({"params": {"encoding": "gbk", "x": 1}}),
        );
        assert_eq!(d, vec!["params.encoding: \"auto\" -> \"gbk\""]);
    }
}
