//! A recipe's text through `RawRecipe::parse` (TOML, includes, `${vars}`) and `Plan::build` (the
//! validation of `runner plan`, stages included).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use runner::pipeline::Plan;
use runner::recipe::RawRecipe;

/// Whether a string could lead the planner out of the (nonexistent) recipe folder: absolute
/// paths, `..`, `hf://` (the network). Planning hashes the files a recipe names, so a recipe
/// naming `/` would walk the machine's disks; that is what the user asked for, not a bug.
fn leaves_the_folder(v: &toml::Value) -> bool {
    match v {
        toml::Value::String(s) => s.contains(['/', '\\']) || s.contains(".."),
        toml::Value::Array(items) => items.iter().any(leaves_the_folder),
        toml::Value::Table(t) => t.values().any(leaves_the_folder),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent-runner-fuzz/recipe.toml");
    let Ok(raw) = RawRecipe::parse(text, path, &[]) else {
        return;
    };
    if raw.table.values().any(leaves_the_folder) {
        return;
    }
    if let Err(e) = Plan::build(raw, runner::stages::registry()) {
        let _ = e.to_string();
    }
});
