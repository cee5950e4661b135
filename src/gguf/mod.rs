//! GGUF file format: types shared by the reader, the writer, the quantizers and the tokenizer
//! bridge. Reference: ggml/include/ggml.h (ggml_type), ggml/docs/gguf.md (file layout),
//! gguf-py/gguf/constants.py (metadata value types, GGML_QUANT_SIZES).

pub mod mix;
pub mod model;
pub mod names;
pub mod quants;
pub mod reader;
pub mod tokenizer;
pub mod writer;

#[cfg(test)]
pub(crate) mod tests;

use std::path::PathBuf;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const QK_K: usize = 256;

/// Errors of the `gguf` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {got:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, got: [u8; 4] },
    #[error("{path}: unsupported GGUF version {got} (expected 2 or 3)")]
    BadVersion { path: PathBuf, got: u32 },
    #[error("{path}: truncated or corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: metadata key `{key}`: expected {expected}, got {got}")]
    MetaType {
        path: PathBuf,
        key: String,
        expected: String,
        got: String,
    },
    #[error("{path}: missing metadata key `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: tensor `{tensor}` has unsupported type {ty}")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ty: String,
    },
    #[error("{path}: tensor `{tensor}` not found")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("tensor `{tensor}`: {what}")]
    Shape { tensor: String, what: String },
    #[error("cannot quantize to {ty}: {what}")]
    Quant { ty: String, what: String },
    #[error("{path}: metadata key `general.architecture`: unsupported architecture `{arch}` (expected one of llama, qwen2, qwen3, gemma2, gemma3, glm4, chatglm)")]
    Arch { path: PathBuf, arch: String },
    #[error("{path}: tensor `{tensor}` of architecture `{arch}`: {what}")]
    ArchTensor {
        path: PathBuf,
        tensor: String,
        arch: String,
        what: String,
    },
    #[error("cannot export this `{model_type}` model as GGUF: {why}; export it as safetensors (`merged`) instead")]
    ArchExport { model_type: String, why: String },
    #[error("tokenizer ({path}): {what}")]
    Tokenizer { path: PathBuf, what: String },
    #[error("{path}: {what}")]
    Json { path: PathBuf, what: String },
    /// Errors from `crate::model` (config.json, safetensors), kept as text so this module
    /// does not depend on that module's error types.
    #[error("{0}")]
    Model(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// ggml tensor types (ggml.h `enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// Any other id (IQ*, TQ*, MXFP4, ...): readable as metadata, not dequantizable here.
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => Other(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Other(id) => id,
        }
    }

    /// (elements per block, bytes per block), as GGML_QUANT_SIZES; None for unknown ids.
    pub fn block(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (QK_K, 84),
            Q3_K => (QK_K, 110),
            Q4_K => (QK_K, 144),
            Q5_K => (QK_K, 176),
            Q6_K => (QK_K, 210),
            Q8_K => (QK_K, 292),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 | F64 => (1, 8),
            Other(_) => return None,
        })
    }

    pub fn name(self) -> String {
        match self {
            GgmlType::Other(id) => format!("ggml type id {id}"),
            t => format!("{t:?}"),
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One GGUF metadata value (gguf.md `gguf_metadata_value_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id plus items (the id is kept so empty arrays round-trip).
    Array(u32, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(..) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    pub fn type_name(&self) -> &'static str {
        [
            "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
            "f64",
        ][self.type_id() as usize]
    }

    /// Integer view of any integer-typed value (GGUF writers differ in the width they pick).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Signed integer view of any integer-typed value.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(_, items) => Some(items),
            _ => None,
        }
    }

    pub fn string_array(items: Vec<String>) -> MetaValue {
        MetaValue::Array(8, items.into_iter().map(MetaValue::String).collect())
    }
}
