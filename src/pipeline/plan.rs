//! Validation of a recipe into a DAG of stages with their fingerprints, before anything runs.

use super::file_hashes::FileHashes;
use super::fingerprint::fingerprint;
use super::stage::{DynStage, InputSlot};
use crate::recipe::{nearest, Location, RawRecipe, RecipeError, RECIPE_KEYS, TOP_LEVEL_KEYS};
use petgraph::graph::{DiGraph, NodeIndex};
use rayon::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A reference from one stage to another's artifact (`raw`, or `raw.test` for a named output).
#[derive(Debug, Clone, PartialEq)]
pub struct InputRef {
    pub slot: String,
    pub stage: String,
    pub output: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ExternalFile {
    pub path: PathBuf,
    pub blake3: String,
}

pub struct PlannedStage {
    pub name: String,
    pub kind: String,
    pub stage: Arc<dyn DynStage>,
    /// Canonical parameters (defaults filled in, input slots removed).
    pub params: serde_json::Value,
    pub inputs: Vec<InputRef>,
    /// Indices into [`Plan::stages`] of the stages this one reads.
    pub deps: Vec<usize>,
    pub external: Vec<ExternalFile>,
    /// The document hashed into [`Self::fingerprint`]; kept to explain cache misses.
    pub fingerprint_doc: serde_json::Value,
    pub fingerprint: String,
    /// The `resources` table, for cluster executors.
    pub resources: Option<toml::Value>,
}

pub struct Plan {
    pub recipe: RawRecipe,
    pub name: String,
    pub seed: u64,
    pub device: String,
    pub executor: String,
    /// Stages in a dependency order.
    pub stages: Vec<PlannedStage>,
}

impl Plan {
    pub fn stage(&self, name: &str) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The most GPUs and nodes any data-parallel stage (training) asks for in its `resources`
    /// (1 where none asks), among the stages of `only` when it names any: how many ranks a run
    /// needs.
    pub fn data_parallel_width(&self, only: &[String]) -> (u64, u64) {
        let ask = |s: &PlannedStage, key: &str| {
            s.resources
                .as_ref()
                .and_then(|r| r.get(key))
                .and_then(|v| v.as_integer())
                .map_or(1, |n| n.max(1) as u64)
        };
        self.stages
            .iter()
            .filter(|s| s.stage.data_parallel() && (only.is_empty() || only.contains(&s.name)))
            .fold((1, 1), |(g, n), s| {
                (g.max(ask(s, "gpus")), n.max(ask(s, "nodes")))
            })
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// The stage, or an error suggesting the nearest stage name.
    pub fn require_stage(&self, name: &str) -> Result<&PlannedStage, RecipeError> {
        self.stage(name).ok_or_else(|| {
            RecipeError::invalid(
                Location::File {
                    file: self.recipe.path.clone(),
                    line: 1,
                    column: 1,
                },
                format!(
                    "no stage named `{name}`{}",
                    hint(nearest(name, self.stages.iter().map(|s| s.name.as_str())))
                ),
            )
        })
    }

    /// Stage names that transitively depend on `index`.
    pub fn dependants(&self, index: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut frontier = vec![index];
        while let Some(i) = frontier.pop() {
            for (j, s) in self.stages.iter().enumerate() {
                if s.deps.contains(&i) && !out.contains(&j) {
                    out.push(j);
                    frontier.push(j);
                }
            }
        }
        out
    }

    /// Builds and validates the plan of `recipe` over the stage kinds of `registry`
    /// (`crate::stages::registry()`). Every problem names the file, line and column.
    pub fn build(recipe: RawRecipe, registry: Vec<Box<dyn DynStage>>) -> Result<Plan, RecipeError> {
        Self::build_with_hashes(recipe, registry, &FileHashes::in_memory())
    }

    /// [`Plan::build`] with the external files hashed through `hashes` (the store's memo, so
    /// unchanged model folders are not read again).
    pub fn build_with_hashes(
        recipe: RawRecipe,
        registry: Vec<Box<dyn DynStage>>,
        hashes: &FileHashes,
    ) -> Result<Plan, RecipeError> {
        let kinds: Vec<Arc<dyn DynStage>> = registry.into_iter().map(Arc::from).collect();
        let header = RecipeHeader::read(&recipe)?;
        let parsed = parse_stages(&recipe, &kinds)?;
        let mut stages = order_by_inputs(&recipe, parsed)?;
        fingerprint_stages(&recipe, &mut stages, header.seed, hashes)?;
        Ok(Plan {
            recipe,
            name: header.name,
            seed: header.seed,
            device: header.device,
            executor: header.executor,
            stages,
        })
    }
}

/// The `[recipe]` table's settings, after checking the recipe's top-level keys.
struct RecipeHeader {
    name: String,
    seed: u64,
    device: String,
    executor: String,
}

impl RecipeHeader {
    fn read(recipe: &RawRecipe) -> Result<Self, RecipeError> {
        let table = &recipe.table;
        for key in table.keys() {
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                return Err(unknown_key(
                    recipe,
                    key,
                    key,
                    TOP_LEVEL_KEYS.iter().copied(),
                ));
            }
        }
        let header = match table.get("recipe") {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t.clone(),
            Some(other) => return Err(wrong_type(recipe, "recipe", "a table", other)),
        };
        for key in header.keys() {
            if !RECIPE_KEYS.contains(&key.as_str()) {
                return Err(unknown_key(
                    recipe,
                    &format!("recipe.{key}"),
                    key,
                    RECIPE_KEYS.iter().copied(),
                ));
            }
        }
        let name = match header.get("name") {
            None => recipe
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "recipe".into()),
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => return Err(wrong_type(recipe, "recipe.name", "a string", other)),
        };
        let seed = match header.get("seed") {
            None => 42,
            Some(toml::Value::Integer(i)) if *i >= 0 => *i as u64,
            Some(other) => {
                return Err(wrong_type(
                    recipe,
                    "recipe.seed",
                    "a non-negative integer",
                    other,
                ))
            }
        };
        let string_or =
            |key: &str, default: &str, allowed: &[&str]| -> Result<String, RecipeError> {
                match header.get(key) {
                    None => Ok(default.to_string()),
                    Some(toml::Value::String(s))
                        if allowed.is_empty()
                            || allowed.contains(&s.as_str())
                            || s.starts_with("cuda") =>
                    {
                        Ok(s.clone())
                    }
                    Some(other) => Err(wrong_type(
                        recipe,
                        &format!("recipe.{key}"),
                        &format!("one of {}", allowed.join(", ")),
                        other,
                    )),
                }
            };
        let device = string_or("device", "auto", &["auto", "cpu", "cuda"])?;
        let executor = string_or("executor", "local", &["local", "slurm"])?;

        Ok(Self {
            name,
            seed,
            device,
            executor,
        })
    }
}

/// First pass: each stage on its own (its name, kind, input slots and parameters), in the
/// recipe's order, without its dependencies resolved.
fn parse_stages(
    recipe: &RawRecipe,
    kinds: &[Arc<dyn DynStage>],
) -> Result<Vec<PlannedStage>, RecipeError> {
    let table = &recipe.table;
    let stages_table = match table.get("stages") {
        Some(toml::Value::Table(t)) if !t.is_empty() => t,
        Some(toml::Value::Table(_)) | None => {
            return Err(RecipeError::invalid(
                recipe.locate("stages"),
                "the recipe has no stages: add a [stages.NAME] table with a `kind`",
            ))
        }
        Some(other) => return Err(wrong_type(recipe, "stages", "a table", other)),
    };
    let mut parsed: Vec<PlannedStage> = Vec::new();
    for (stage_name, value) in stages_table {
        let base = format!("stages.{stage_name}");
        // Stage names become folder names, log fields and lines of Slurm batch scripts.
        if !is_plain_name(stage_name) {
            return Err(RecipeError::invalid(
                recipe.locate(&base),
                format!(
                    "stage name {stage_name:?} is not allowed: use letters, digits, `_` and `-` only"
                ),
            ));
        }
        let mut params = match value {
            toml::Value::Table(t) => t.clone(),
            other => return Err(wrong_type(recipe, &base, "a table", other)),
        };
        let kind = match params.remove("kind") {
            Some(toml::Value::String(k)) => k,
            Some(other) => {
                return Err(wrong_type(
                    recipe,
                    &format!("{base}.kind"),
                    "a string",
                    &other,
                ))
            }
            None => {
                return Err(RecipeError::invalid(
                    recipe.locate(&base),
                    format!(
                        "stage `{stage_name}` has no `kind` (one of: {})",
                        kinds
                            .iter()
                            .map(|k| k.kind())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        };
        let stage = kinds
            .iter()
            .find(|k| k.kind() == kind)
            .cloned()
            .ok_or_else(|| {
                RecipeError::invalid(
                    recipe.locate(&format!("{base}.kind")),
                    format!(
                        "unknown stage kind `{kind}`{} (known kinds: {})",
                        hint(nearest(&kind, kinds.iter().map(|k| k.kind()))),
                        kinds
                            .iter()
                            .map(|k| k.kind())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        let resources = params.remove("resources");
        let mut inputs = Vec::new();
        for slot in stage.input_slots() {
            let refs = take_slot(recipe, &base, &mut params, slot)?;
            if slot.required && refs.is_empty() {
                return Err(RecipeError::invalid(
                    recipe.locate(&base),
                    format!(
                        "stage `{stage_name}` ({kind}) needs `{} = \"STAGE\"` naming a stage that makes {}",
                        slot.key,
                        slot.accepts.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" or ")
                    ),
                ));
            }
            inputs.extend(refs);
        }
        let params_json = stage
            .parse(&params)
            .map_err(|e| param_error(recipe, &base, stage.as_ref(), e))?;
        parsed.push(PlannedStage {
            name: stage_name.clone(),
            kind,
            stage,
            params: params_json,
            inputs,
            deps: Vec::new(),
            external: Vec::new(),
            fingerprint_doc: serde_json::Value::Null,
            fingerprint: String::new(),
            resources,
        });
    }
    Ok(parsed)
}

/// Second pass: resolves every input to the stage it names, checks the artifact kinds and
/// named outputs, refuses cycles, and returns the stages in a dependency order with `deps`
/// pointing into that order.
fn order_by_inputs(
    recipe: &RawRecipe,
    mut parsed: Vec<PlannedStage>,
) -> Result<Vec<PlannedStage>, RecipeError> {
    let index: HashMap<String, usize> = parsed
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..parsed.len()).map(|i| graph.add_node(i)).collect();
    for i in 0..parsed.len() {
        let mut deps = Vec::new();
        for input in &parsed[i].inputs {
            let at = recipe.locate(&format!("stages.{}.{}", parsed[i].name, input.slot));
            let j = *index.get(&input.stage).ok_or_else(|| {
                RecipeError::invalid(
                    at.clone(),
                    format!(
                        "`{}` names stage `{}`, which the recipe does not define{}",
                        input.slot,
                        input.stage,
                        hint(nearest(
                            &input.stage,
                            parsed.iter().map(|s| s.name.as_str())
                        ))
                    ),
                )
            })?;
            let upstream = &parsed[j];
            if let Some(output) = &input.output {
                let outputs = upstream.stage.named_outputs(&upstream.params);
                if !outputs.contains(output) {
                    return Err(RecipeError::invalid(
                        at.clone(),
                        format!(
                            "stage `{}` has no output `{output}` (it has: {})",
                            upstream.name,
                            if outputs.is_empty() {
                                "none".to_string()
                            } else {
                                outputs.join(", ")
                            }
                        ),
                    ));
                }
            }
            let slot = parsed[i]
                .stage
                .input_slots()
                .iter()
                .find(|s| s.key == input.slot)
                .copied();
            if let Some(slot) = slot {
                if !slot.accepts.contains(&upstream.stage.output()) {
                    return Err(RecipeError::invalid(
                        at.clone(),
                        format!(
                            "`{}` of stage `{}` ({}) expects {}, but stage `{}` ({}) makes {}",
                            input.slot,
                            parsed[i].name,
                            parsed[i].kind,
                            slot.accepts
                                .iter()
                                .map(|a| a.to_string())
                                .collect::<Vec<_>>()
                                .join(" or "),
                            upstream.name,
                            upstream.kind,
                            upstream.stage.output()
                        ),
                    ));
                }
            }
            if !deps.contains(&j) {
                deps.push(j);
            }
            graph.add_edge(nodes[j], nodes[i], ());
        }
        parsed[i].deps = deps;
    }
    let order = petgraph::algo::toposort(&graph, None).map_err(|cycle| {
        let name = &parsed[graph[cycle.node_id()]].name;
        RecipeError::invalid(
            recipe.locate(&format!("stages.{name}")),
            format!("stage `{name}` depends on itself through its inputs (a cycle)"),
        )
    })?;

    // Reorder into dependency order and remap dependency indices.
    let order: Vec<usize> = order.into_iter().map(|n| graph[n]).collect();
    let mut position = vec![0; parsed.len()];
    for (new, &old) in order.iter().enumerate() {
        position[old] = new;
    }
    let mut slots: Vec<Option<PlannedStage>> = parsed.into_iter().map(Some).collect();
    let mut stages: Vec<PlannedStage> = order
        .iter()
        .map(|&old| slots[old].take().expect("each stage placed once"))
        .collect();
    for s in &mut stages {
        s.deps = s.deps.iter().map(|&d| position[d]).collect();
    }
    Ok(stages)
}

/// Third pass, in dependency order: each stage's fingerprint over its kind, VERSION, runner's
/// version, parameters (less its operational keys), input fingerprints, external files
/// (hashed through `hashes`) and the recipe's seed.
fn fingerprint_stages(
    recipe: &RawRecipe,
    stages: &mut [PlannedStage],
    seed: u64,
    hashes: &FileHashes,
) -> Result<(), RecipeError> {
    let index: HashMap<String, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    for i in 0..stages.len() {
        let stage_error = |message: String| {
            RecipeError::invalid(
                recipe.locate(&format!("stages.{}", stages[i].name)),
                message,
            )
        };
        let name = &stages[i].name;
        let files = stages[i]
            .stage
            .external_files(&stages[i].params, &recipe.dir)
            .map_err(|e| stage_error(format!("stage `{name}`: {e}")))?;
        // Hashed side by side: a model folder is a few large files.
        let external = files
            .into_par_iter()
            .map(|path| match hashes.hash(&path) {
                Ok(blake3) => Ok(ExternalFile { path, blake3 }),
                Err(e) => Err(format!("cannot read {}: {e}", path.display())),
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(stage_error)?;
        let revision = stages[i]
            .stage
            .source_revision(&stages[i].params, &recipe.dir)
            .map_err(|e| stage_error(format!("stage `{name}`: {e}")))?;
        let mut input_fps = serde_json::Map::new();
        for input in &stages[i].inputs {
            let upstream = &stages[index[&input.stage]];
            let entry = match &input.output {
                Some(o) => format!("{}.{o}", upstream.fingerprint),
                None => upstream.fingerprint.clone(),
            };
            input_fps
                .entry(input.slot.clone())
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("slot entries are arrays")
                .push(json!(entry));
        }
        let mut params = stages[i].params.clone();
        if let Some(map) = params.as_object_mut() {
            for key in stages[i].stage.operational_keys() {
                map.remove(*key);
            }
        }
        let mut doc = json!({
            "kind": stages[i].kind,
            "version": stages[i].stage.version(),
            // A new runner may compute a stage differently even when the stage's own
            // VERSION was not bumped: its artifacts are not reused across releases.
            "runner": env!("CARGO_PKG_VERSION"),
            "params": params,
            "inputs": input_fps,
            "external": external.iter().map(|f| json!({
                "name": f.path.file_name().map(|n| n.to_string_lossy().to_string()),
                "blake3": f.blake3,
            })).collect::<Vec<_>>(),
            "seed": seed,
        });
        if let Some(revision) = revision {
            // Only stages with such a source carry the key: other fingerprints are unchanged.
            doc["source_revision"] = json!(revision);
        }
        stages[i].fingerprint = fingerprint(&doc);
        stages[i].fingerprint_doc = doc;
        stages[i].external = external;
    }

    Ok(())
}

fn hint(candidate: Option<&str>) -> String {
    candidate
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

fn unknown_key<'a>(
    recipe: &RawRecipe,
    path: &str,
    key: &str,
    valid: impl Iterator<Item = &'a str> + Clone,
) -> RecipeError {
    RecipeError::invalid(
        recipe.locate(path),
        format!(
            "unknown key `{key}`{} (valid keys: {})",
            hint(nearest(key, valid.clone())),
            valid.collect::<Vec<_>>().join(", ")
        ),
    )
}

/// Stage names: `[A-Za-z0-9_-]+`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn wrong_type(recipe: &RawRecipe, path: &str, expected: &str, found: &toml::Value) -> RecipeError {
    RecipeError::invalid(
        recipe.locate(path),
        format!(
            "`{path}` must be {expected}, found {} `{found}`",
            found.type_str()
        ),
    )
}

fn take_slot(
    recipe: &RawRecipe,
    base: &str,
    params: &mut toml::Table,
    slot: &InputSlot,
) -> Result<Vec<InputRef>, RecipeError> {
    let path = format!("{base}.{}", slot.key);
    let names: Vec<String> = match params.remove(slot.key) {
        None => return Ok(Vec::new()),
        Some(toml::Value::String(s)) => vec![s],
        Some(toml::Value::Array(items)) if slot.many => items
            .into_iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s),
                other => Err(wrong_type(recipe, &path, "a list of stage names", &other)),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            let expected = if slot.many {
                "a stage name or a list of stage names"
            } else {
                "a stage name"
            };
            return Err(wrong_type(recipe, &path, expected, &other));
        }
    };
    Ok(names
        .into_iter()
        .map(|n| {
            let (stage, output) = match n.split_once('.') {
                Some((s, o)) => (s.to_string(), Some(o.to_string())),
                None => (n, None),
            };
            InputRef {
                slot: slot.key.to_string(),
                stage,
                output,
            }
        })
        .collect())
}

fn param_error(
    recipe: &RawRecipe,
    base: &str,
    stage: &dyn DynStage,
    error: super::stage::ParamError,
) -> RecipeError {
    let message = error.message;
    // serde: "unknown field `x`, expected one of `a`, `b`" / "expected `a` or `b`"
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let mut valid: Vec<String> = tail
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            valid.extend(stage.input_slots().iter().map(|s| s.key.to_string()));
            valid.push("resources".into());
            let parent = error.key.rsplit_once('.').map(|(p, _)| p.to_string());
            let full = match (&parent, error.key.is_empty()) {
                (_, true) => format!("{base}.{field}"),
                (Some(p), false) => format!("{base}.{p}.{field}"),
                (None, false) => format!("{base}.{field}"),
            };
            return RecipeError::invalid(
                recipe.locate(&full),
                format!(
                    "unknown key `{field}` in stage kind `{}`{} (valid keys: {})",
                    stage.kind(),
                    hint(nearest(field, valid.iter().map(String::as_str))),
                    valid.join(", ")
                ),
            );
        }
    }
    let full = if error.key.is_empty() {
        base.to_string()
    } else {
        format!("{base}.{}", error.key)
    };
    RecipeError::invalid(recipe.locate(&full), format!("`{full}`: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_hold_runners_version_and_stage_names_are_plain() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), "a,b\n1,2\n").unwrap();
        let recipe = dir.path().join("r.toml");
        std::fs::write(
            &recipe,
            "[stages.raw_1-x]\nkind = \"ingest\"\npath = \"d.csv\"\n",
        )
        .unwrap();
        let plan = Plan::build(
            crate::recipe::RawRecipe::load(&recipe, &[]).unwrap(),
            crate::stages::registry(),
        )
        .unwrap();
        let doc = &plan.stage("raw_1-x").unwrap().fingerprint_doc;
        assert_eq!(doc["runner"], env!("CARGO_PKG_VERSION"));
        for name in ["raw", "RAW_2", "a-b"] {
            assert!(is_plain_name(name), "{name}");
        }
        for name in ["", "a b", "a\nb", "a.b", "../x", "ä", "a;b"] {
            assert!(!is_plain_name(name), "{name:?}");
        }
    }
}
