//! Recipes: TOML files that name the stages of a pipeline and their parameters.
//!
//! Loading happens in two layers. [`RawRecipe`] is the merged TOML (includes, `--set` overrides and
//! `${vars}` applied) with the origin of every key kept for error messages. The pipeline then
//! validates it against the stage registry into a plan; stages never see raw TOML.

mod location;

pub use crate::text::suggest::nearest;
pub use location::{Location, SpanMap};

use std::path::{Path, PathBuf};

/// Keys a recipe may hold at its top level.
pub const TOP_LEVEL_KEYS: &[&str] = &["recipe", "vars", "stages", "include"];
/// Keys of the `[recipe]` table.
pub const RECIPE_KEYS: &[&str] = &["name", "seed", "executor", "description", "device"];

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: cannot read recipe: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: invalid TOML: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
    #[error("{0}: recipe includes itself (include cycle)")]
    IncludeCycle(PathBuf),
}

impl RecipeError {
    pub fn invalid(location: Location, message: impl Into<String>) -> Self {
        RecipeError::Invalid {
            location,
            message: message.into(),
        }
    }
}

/// A recipe after includes, overrides and variable substitution, before validation.
#[derive(Debug, Clone)]
pub struct RawRecipe {
    /// The merged recipe, `include` removed.
    pub table: toml::Table,
    pub spans: SpanMap,
    /// The recipe file the user named.
    pub path: PathBuf,
    /// Relative paths in the recipe are relative to this folder.
    pub dir: PathBuf,
    /// The `--set` arguments applied, in order.
    pub overrides: Vec<String>,
}

impl RawRecipe {
    /// Reads `path`, merges its includes, applies `--set k=v` overrides and substitutes `${vars}`.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = read_recipe(path)?;
        Self::parse(&text, path, overrides)
    }

    /// [`RawRecipe::load`] on text already read from `path`: `path` names the recipe in errors and
    /// its folder is where includes and relative paths are looked up.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let mut spans = SpanMap::default();
        let mut stack = Vec::new();
        let table = merge_includes(path, text, &mut spans, &mut stack)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_table(table, spans, path.to_path_buf(), dir, overrides)
    }

    /// Builds a recipe from an already merged table (a run record's resolved recipe).
    pub fn from_table(
        mut table: toml::Table,
        mut spans: SpanMap,
        path: PathBuf,
        dir: PathBuf,
        overrides: &[String],
    ) -> Result<Self, RecipeError> {
        for arg in overrides {
            apply_override(&mut table, &mut spans, arg)?;
        }
        substitute_vars(&mut table, &spans)?;
        Ok(Self {
            table,
            spans,
            path,
            dir,
            overrides: overrides.to_vec(),
        })
    }

    pub fn locate(&self, dotted: &str) -> Location {
        self.spans.locate(dotted)
    }
}

fn read_recipe(path: &Path) -> Result<String, RecipeError> {
    std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_with_includes(
    path: &Path,
    spans: &mut SpanMap,
    stack: &mut Vec<PathBuf>,
) -> Result<toml::Table, RecipeError> {
    let text = read_recipe(path)?;
    merge_includes(path, &text, spans, stack)
}

/// Parses `text` (the contents of `path`) and merges the recipes it includes under it.
fn merge_includes(
    path: &Path,
    text: &str,
    spans: &mut SpanMap,
    stack: &mut Vec<PathBuf>,
) -> Result<toml::Table, RecipeError> {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if stack.contains(&canonical) {
        return Err(RecipeError::IncludeCycle(path.to_path_buf()));
    }
    let syntax = |span: Option<std::ops::Range<usize>>, message: &str| {
        let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        RecipeError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: message.trim().to_string(),
        }
    };
    // `toml` first: toml_edit 0.23 panics ("all items have spans") on some invalid documents, e.g.
    // a dotted key after a line of bare `=`s; it only records where valid keys are.
    let mut table: toml::Table = toml::from_str(text).map_err(|e| syntax(e.span(), e.message()))?;
    let doc =
        toml_edit::Document::parse(text.to_owned()).map_err(|e| syntax(e.span(), e.message()))?;
    let mut own_spans = SpanMap::default();
    own_spans.record_document(path, text, &doc);

    let includes = match table.remove("include") {
        None => Vec::new(),
        Some(toml::Value::String(s)) => vec![s],
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s),
                other => Err(RecipeError::invalid(
                    own_spans.locate("include"),
                    format!("`include` must list file paths, found {}", other.type_str()),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(RecipeError::invalid(
                own_spans.locate("include"),
                format!(
                    "`include` must be a path or a list of paths, found {}",
                    other.type_str()
                ),
            ))
        }
    };

    stack.push(canonical);
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut merged = toml::Table::new();
    for include in includes {
        let included_path = base_dir.join(&include);
        if !included_path.exists() {
            return Err(RecipeError::invalid(
                own_spans.locate("include"),
                format!(
                    "included recipe `{}` does not exist",
                    included_path.display()
                ),
            ));
        }
        let included = load_with_includes(&included_path, spans, stack)?;
        deep_merge(&mut merged, included);
    }
    stack.pop();
    deep_merge(&mut merged, std::mem::take(&mut table));
    spans.extend(own_spans);
    Ok(merged)
}

/// Merges `over` into `base`; tables merge key by key, anything else replaces.
pub fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Parses the value of `--set key=value`: a TOML value when it parses as one, else a string.
pub fn parse_override_value(raw: &str) -> toml::Value {
    let trimmed = raw.trim();
    if let Ok(mut t) = toml::from_str::<toml::Table>(&format!("v = {trimmed}")) {
        if let Some(v) = t.remove("v") {
            return v;
        }
    }
    toml::Value::String(raw.to_string())
}

fn apply_override(
    table: &mut toml::Table,
    spans: &mut SpanMap,
    arg: &str,
) -> Result<(), RecipeError> {
    let location = Location::CommandLine(arg.to_string());
    let (key, value) = arg.split_once('=').ok_or_else(|| {
        RecipeError::invalid(
            location.clone(),
            "expected KEY=VALUE, e.g. stages.sft.learning_rate=1e-4",
        )
    })?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(RecipeError::invalid(
            location,
            format!("`{key}` is not a dotted key"),
        ));
    }
    let mut current = table;
    for (depth, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(t) => t,
            other => {
                return Err(RecipeError::invalid(
                    location,
                    format!(
                        "`{}` is a {}, not a table",
                        parts[..=depth].join("."),
                        other.type_str()
                    ),
                ))
            }
        };
    }
    current.insert(
        parts[parts.len() - 1].to_string(),
        parse_override_value(value),
    );
    spans.insert(parts.join("."), location);
    Ok(())
}

/// Replaces `${name}` in every string with the value of `[vars].name`.
fn substitute_vars(table: &mut toml::Table, spans: &SpanMap) -> Result<(), RecipeError> {
    let vars = match table.get("vars") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t.clone(),
        Some(other) => {
            return Err(RecipeError::invalid(
                spans.locate("vars"),
                format!("`vars` must be a table, found {}", other.type_str()),
            ))
        }
    };
    for (key, value) in table.iter_mut() {
        if key == "vars" {
            continue;
        }
        substitute_value(value, &vars, spans, key)?;
    }
    Ok(())
}

fn substitute_value(
    value: &mut toml::Value,
    vars: &toml::Table,
    spans: &SpanMap,
    path: &str,
) -> Result<(), RecipeError> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            *value = expand(s, vars).map_err(|name| {
                RecipeError::invalid(
                    spans.locate(path),
                    format!(
                        "`${{{name}}}` is not defined in [vars]{}",
                        nearest(&name, vars.keys().map(String::as_str))
                            .map(|n| format!("; did you mean `{n}`?"))
                            .unwrap_or_default()
                    ),
                )
            })?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, vars, spans, &format!("{path}.{i}"))?;
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                substitute_value(v, vars, spans, &format!("{path}.{k}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands `${name}`; a string that is exactly one reference keeps the variable's type.
fn expand(s: &str, vars: &toml::Table) -> Result<toml::Value, String> {
    let lookup = |name: &str| vars.get(name).ok_or_else(|| name.to_string());
    if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        if !name.contains('}') && !name.contains("${") {
            return lookup(name).cloned();
        }
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| after.to_string())?;
        let name = &after[..end];
        match lookup(name)? {
            toml::Value::String(v) => out.push_str(v),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(toml::Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn vars_overrides_and_includes_merge() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "base.toml",
            "[vars]\nd = \"data\"\n[stages.raw]\nkind = \"ingest\"\npath = \"${d}/*.csv\"\nencoding = \"auto\"\n",
        );
        let main = write(
            dir.path(),
            "main.toml",
            "include = [\"base.toml\"]\n[recipe]\nname = \"x\"\n[stages.raw]\nencoding = \"gbk\"\n",
        );
        let r = RawRecipe::load(&main, &["stages.raw.encoding=gb18030".into()]).unwrap();
        let raw = r.table["stages"]["raw"].as_table().unwrap();
        assert_eq!(raw["path"].as_str(), Some("data/*.csv"));
        assert_eq!(raw["encoding"].as_str(), Some("gb18030"));
        assert_eq!(
            r.locate("stages.raw.encoding"),
            Location::CommandLine("stages.raw.encoding=gb18030".into())
        );
    }

    #[test]
    fn parse_from_text_matches_load() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.toml", "[vars]\nd = \"data\"\n");
        let text =
            "include = \"base.toml\"\n[stages.raw]\nkind = \"ingest\"\npath = \"${d}.csv\"\n";
        let main = write(dir.path(), "main.toml", text);
        let loaded = RawRecipe::load(&main, &[]).unwrap();
        let parsed = RawRecipe::parse(text, &main, &[]).unwrap();
        assert_eq!(parsed.table, loaded.table);
        assert_eq!(
            parsed.locate("stages.raw.path"),
            loaded.locate("stages.raw.path")
        );
        let err = RawRecipe::parse("a = [1,\n", &main, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("main.toml:"), "{err}");
    }

    #[test]
    fn invalid_toml_that_crashed_toml_edit_is_a_syntax_error() {
        // Found by `cargo fuzz run recipe`: toml_edit's parser panicked on it.
        let text =
            "[recipe]\n= = faladam_beta2 = 099\n.wnum_ge;nerationsdedup= \"<rea\0adam_\0In\"\n";
        let err = RawRecipe::parse(text, Path::new("fuzz.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("fuzz.toml:2:"), "{err}");
    }

    #[test]
    fn syntax_error_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bad.toml",
            "[recipe]\nname = \"x\"\nseed = = 3\n",
        );
        let err = RawRecipe::load(&p, &[]).unwrap_err().to_string();
        assert!(err.contains("bad.toml:3:"), "{err}");
    }

    #[test]
    fn undefined_var_is_an_error_with_location() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "r.toml",
            "[vars]\ndata_dir = \"d\"\n[stages.raw]\nkind = \"ingest\"\npath = \"${data_dri}/x.csv\"\n",
        );
        let err = RawRecipe::load(&p, &[]).unwrap_err().to_string();
        assert!(err.contains("r.toml:5:1"), "{err}");
        assert!(err.contains("did you mean `data_dir`"), "{err}");
    }

    #[test]
    fn override_values_are_typed() {
        assert_eq!(parse_override_value("1e-4"), toml::Value::Float(1e-4));
        assert_eq!(parse_override_value("3"), toml::Value::Integer(3));
        assert_eq!(
            parse_override_value("gbk"),
            toml::Value::String("gbk".into())
        );
        assert_eq!(parse_override_value("true"), toml::Value::Boolean(true));
    }
}
