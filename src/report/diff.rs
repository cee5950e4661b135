//! Differences between two resolved recipes by dotted key (`stages.sft.learning_rate`), and the
//! resolved recipe shown as TOML (the recipe's own language) with a JSON fallback.

use serde_json::{Map, Value};

/// One parameter that differs; None where the key is absent from that run's recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: String,
    pub left: Option<Value>,
    pub right: Option<Value>,
}

/// Flattens nested tables to dotted keys in document order. Arrays are leaves: a list of reward
/// functions reads better whole than as `rewards.0`, `rewards.1`.
pub fn flatten(value: &Value) -> Vec<(String, Value)> {
    fn walk(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, child, out);
                }
            }
            _ if prefix.is_empty() => {}
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}

/// Keys whose values differ, in the left recipe's order, then keys only the right one has.
/// Numbers compare by value, so `2e-4` equals `0.0002`.
pub fn diff_recipes(left: &Value, right: &Value) -> Vec<Change> {
    let left_flat = flatten(left);
    let right_flat: Map<String, Value> = flatten(right).into_iter().collect();
    let left_keys: Map<String, Value> = left_flat.iter().cloned().collect();
    let mut changes = Vec::new();
    for (key, value) in &left_flat {
        match right_flat.get(key) {
            Some(other) if same_value(value, other) => {}
            other => changes.push(Change {
                key: key.clone(),
                left: Some(value.clone()),
                right: other.cloned(),
            }),
        }
    }
    for (key, value) in &right_flat {
        if !left_keys.contains_key(key) {
            changes.push(Change {
                key: key.clone(),
                left: None,
                right: Some(value.clone()),
            });
        }
    }
    changes
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

/// Compact text of a value for a table cell: strings without quotes, the rest as JSON.
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The resolved recipe as TOML; pretty JSON when it cannot be TOML (nulls, mixed arrays).
pub fn recipe_text(recipe: &Value) -> (String, &'static str) {
    if recipe.is_object() {
        if let Ok(text) = toml::to_string_pretty(recipe) {
            return (text, "toml");
        }
    }
    let json = serde_json::to_string_pretty(recipe).unwrap_or_else(|_| recipe.to_string());
    (json, "json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diff_reports_changed_added_and_removed_keys() {
        let a = json!({"recipe": {"name": "m", "seed": 42}, "stages": {"sft": {"learning_rate": 0.0002, "epochs": 3, "lora": {"r": 8}}}});
        let b = json!({"recipe": {"name": "m", "seed": 7}, "stages": {"sft": {"learning_rate": 2e-4, "lora": {"r": 16}, "rewards": ["a", "b"]}}});
        let changes = diff_recipes(&a, &b);
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "recipe.seed",
                "stages.sft.epochs",
                "stages.sft.lora.r",
                "stages.sft.rewards"
            ]
        );
        assert_eq!(changes[1].right, None);
        assert_eq!(changes[3].left, None);
        assert_eq!(
            value_text(changes[3].right.as_ref().unwrap()),
            r#"["a","b"]"#
        );
        assert!(diff_recipes(&a, &a).is_empty());
    }

    #[test]
    fn recipe_renders_as_toml_or_json() {
        let (text, lang) =
            recipe_text(&json!({"recipe": {"name": "m"}, "stages": {"raw": {"kind": "ingest"}}}));
        assert_eq!(lang, "toml");
        assert!(
            text.contains("[stages.raw]") && text.contains("kind = \"ingest\""),
            "{text}"
        );
        let (text, lang) = recipe_text(&json!({"recipe": {"name": null}}));
        assert_eq!(lang, "json");
        assert!(text.contains("null"));
    }
}
