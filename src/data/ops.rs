//! Row operations of the ingest stage: column mapping, missing values, filters, dedup, splits.

use super::{DataError, Table};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Renames columns, `new = old`; the other columns stay.
pub fn rename_columns(
    table: &mut Table,
    mapping: &BTreeMap<String, String>,
) -> Result<(), DataError> {
    for (new, old) in mapping {
        let i = table
            .column_index(old)
            .ok_or_else(|| missing_column(table, old, "columns"))?;
        table.columns[i] = new.clone();
    }
    Ok(())
}

fn missing_column(table: &Table, name: &str, key: &str) -> DataError {
    let hint = crate::text::suggest::nearest(name, table.columns.iter().map(String::as_str))
        .map(|n| format!("; did you mean `{n}`?"))
        .unwrap_or_default();
    DataError::Invalid(format!(
        "`{key}` names column `{name}`, which the data does not have (columns: {}){hint}",
        table.columns.join(", ")
    ))
}

/// Resolves a column named in the recipe: its current name, or its name before `columns` renamed it.
pub fn resolve_column(
    table: &Table,
    name: &str,
    mapping: &BTreeMap<String, String>,
    key: &str,
) -> Result<usize, DataError> {
    if let Some(i) = table.column_index(name) {
        return Ok(i);
    }
    mapping
        .iter()
        .find(|(_, old)| old.as_str() == name)
        .and_then(|(new, _)| table.column_index(new))
        .ok_or_else(|| missing_column(table, name, key))
}

/// Drops rows where any of `columns` is null or only whitespace.
pub fn drop_missing(table: &mut Table, columns: &[usize]) -> usize {
    let before = table.rows.len();
    table.rows.retain(|row| {
        columns
            .iter()
            .all(|&i| row[i].as_deref().is_some_and(|v| !v.trim().is_empty()))
    });
    before - table.rows.len()
}

/// Keeps the first row of each distinct combination of `columns`.
pub fn dedup(table: &mut Table, columns: &[usize]) -> usize {
    let before = table.rows.len();
    let mut seen = HashSet::new();
    table.rows.retain(|row| {
        let key: Vec<Option<&str>> = columns.iter().map(|&i| row[i].as_deref()).collect();
        seen.insert(blake3::hash(format!("{key:?}").as_bytes()))
    });
    before - table.rows.len()
}

/// A row filter on one column's text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub column: String,
    /// Minimum length in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_chars: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chars: Option<usize>,
    /// Keep rows whose value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
    /// Drop rows whose value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_matches: Option<String>,
}

pub fn apply_filter(table: &mut Table, column: usize, filter: &Filter) -> Result<usize, DataError> {
    let compile = |p: &Option<String>| {
        p.as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| DataError::Invalid(format!("filter on `{}`: {e}", filter.column)))
    };
    let keep = compile(&filter.matches)?;
    let drop = compile(&filter.not_matches)?;
    let before = table.rows.len();
    table.rows.retain(|row| {
        let v = row[column].as_deref().unwrap_or("");
        let n = v.chars().count();
        filter.min_chars.is_none_or(|m| n >= m)
            && filter.max_chars.is_none_or(|m| n <= m)
            && keep.as_ref().is_none_or(|r| r.is_match(v))
            && drop.as_ref().is_none_or(|r| !r.is_match(v))
    });
    Ok(before - table.rows.len())
}

/// How to hold out a test split: a fraction or a row count, shuffled with a seed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_rows: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl SplitSpec {
    pub fn validate(&self) -> Result<(), String> {
        match (self.test, self.test_rows) {
            (Some(_), Some(_)) => Err("give `test` or `test_rows`, not both".into()),
            (None, None) => Err("give `test` (a fraction) or `test_rows` (a count)".into()),
            (Some(f), None) if !(0.0..1.0).contains(&f) => {
                Err(format!("`test` must be a fraction in [0, 1), got {f}"))
            }
            _ => Ok(()),
        }
    }

    /// Number of test rows for `n` rows (a fraction rounds up, as scikit-learn's split does).
    pub fn test_count(&self, n: usize) -> usize {
        match (self.test, self.test_rows) {
            (_, Some(rows)) => rows.min(n),
            (Some(f), None) => ((f * n as f64).ceil() as usize).min(n),
            (None, None) => 0,
        }
    }
}

/// Splits rows into (train, test); rows keep their original order within each split.
pub fn split(table: Table, spec: &SplitSpec, default_seed: u64) -> (Table, Table) {
    let n = table.rows.len();
    let n_test = spec.test_count(n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed.unwrap_or(default_seed));
    order.shuffle(&mut rng);
    let test_set: HashSet<usize> = order[..n_test].iter().copied().collect();
    let mut train = Table::new(table.columns.clone());
    let mut test = Table::new(table.columns);
    for (i, row) in table.rows.into_iter().enumerate() {
        if test_set.contains(&i) {
            test.rows.push(row);
        } else {
            train.rows.push(row);
        }
    }
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> Table {
        Table {
            columns: vec!["q".into(), "a".into()],
            rows: (0..n)
                .map(|i| vec![Some(format!("q{}", i % 7)), Some(format!("a{i}"))])
                .collect(),
        }
    }

    #[test]
    fn split_is_deterministic_and_complete() {
        let spec = SplitSpec {
            test: Some(0.05),
            test_rows: None,
            seed: Some(42),
        };
        let (tr1, te1) = split(table(101), &spec, 0);
        let (tr2, te2) = split(table(101), &spec, 0);
        assert_eq!((tr1.len(), te1.len()), (95, 6));
        assert_eq!(te1, te2);
        assert_eq!(tr1, tr2);
        let mut all: Vec<_> = tr1.rows.iter().chain(te1.rows.iter()).cloned().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 101);
    }

    #[test]
    fn dedup_and_dropna() {
        let mut t = table(14);
        t.rows[3][1] = None;
        assert_eq!(drop_missing(&mut t, &[1]), 1);
        assert_eq!(dedup(&mut t, &[0]), 6);
        assert_eq!(t.len(), 7);
    }
}
