//! An in-memory table of optional strings, and its Parquet form.
//!
//! Fine-tuning data is text: every column is a nullable UTF-8 string. polars does the Parquet I/O.

use super::DataError;
use polars::prelude::*;
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub fn new(columns: Vec<String>) -> Self {
        Self {
            columns,
            rows: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// Appends `other`, aligning columns by name; columns missing on either side become nulls.
    pub fn append(&mut self, other: Table) {
        for c in &other.columns {
            if self.column_index(c).is_none() {
                self.columns.push(c.clone());
                for row in &mut self.rows {
                    row.push(None);
                }
            }
        }
        let map: Vec<Option<usize>> = self.columns.iter().map(|c| other.column_index(c)).collect();
        for mut row in other.rows {
            let aligned = map
                .iter()
                .map(|i| i.and_then(|i| row.get_mut(i).and_then(Option::take)))
                .collect();
            self.rows.push(aligned);
        }
    }

    pub fn get<'a>(&'a self, row: &'a [Option<String>], column: &str) -> Option<&'a str> {
        self.column_index(column)
            .and_then(|i| row.get(i))
            .and_then(|v| v.as_deref())
    }

    pub fn to_dataframe(&self) -> Result<DataFrame, DataError> {
        let columns: Vec<Column> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let values: Vec<Option<&str>> = self.rows.iter().map(|r| r[i].as_deref()).collect();
                Column::new(name.as_str().into(), values)
            })
            .collect();
        DataFrame::new(self.rows.len(), columns).map_err(|e| DataError::Invalid(e.to_string()))
    }

    pub fn from_dataframe(df: &DataFrame) -> Result<Self, DataError> {
        let mut columns = Vec::new();
        let mut data: Vec<Vec<Option<String>>> = Vec::new();
        for col in df.columns() {
            columns.push(col.name().to_string());
            let as_str = col
                .cast(&DataType::String)
                .map_err(|e| DataError::Invalid(format!("column `{}`: {e}", col.name())))?;
            let ca = as_str
                .str()
                .map_err(|e| DataError::Invalid(format!("column `{}`: {e}", col.name())))?;
            data.push(ca.into_iter().map(|v| v.map(str::to_string)).collect());
        }
        let height = df.height();
        let rows = (0..height)
            .map(|r| data.iter_mut().map(|c| c[r].take()).collect())
            .collect();
        Ok(Self { columns, rows })
    }

    /// Writes Parquet atomically enough for the store: the caller writes into a temp folder.
    pub fn write_parquet(&self, path: &Path) -> Result<(), DataError> {
        let mut df = self.to_dataframe()?;
        let file = std::fs::File::create(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        ParquetWriter::new(file)
            .finish(&mut df)
            .map_err(|e| DataError::Parquet {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    pub fn read_parquet(path: &Path) -> Result<Self, DataError> {
        let file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let df = ParquetReader::new(file)
            .finish()
            .map_err(|e| DataError::Parquet {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Self::from_dataframe(&df)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parquet_round_trip_keeps_nulls_and_unicode() {
        let t = Table {
            columns: vec!["a".into(), "b".into()],
            rows: vec![
                vec![Some("中文, \"quoted\"\nline".into()), None],
                vec![Some("x".into()), Some("𠀀".into())],
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.parquet");
        t.write_parquet(&p).unwrap();
        assert_eq!(Table::read_parquet(&p).unwrap(), t);
    }
}
