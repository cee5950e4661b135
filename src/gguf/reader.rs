//! GGUF v2/v3 reader: header, typed metadata (arrays included), tensor infos, alignment
//! (`general.alignment`, default 32) and an mmap of the tensor data, dequantized on request.
//! Reference: ggml/docs/gguf.md, gguf-py/gguf/gguf_reader.py.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::gguf::{quants, Error, GgmlType, MetaValue, Result, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::model::hf::HostTensor;

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension; HF shape is this reversed.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major (HF/PyTorch) shape.
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file; metadata keeps file order.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    mmap: Bytes,
}

/// The file's bytes: memory-mapped when opened from disk, owned when parsed from memory.
#[derive(Debug)]
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Nesting depth of metadata arrays (arrays of arrays) accepted; gguf-py and llama.cpp write one
/// level. A bound keeps a hostile file from recursing the reader off the stack.
const MAX_ARRAY_DEPTH: usize = 8;

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::Corrupt {
                path: self.path.to_path_buf(),
                offset: self.pos as u64,
                what: format!("file ends inside {what}"),
            }),
        }
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// Counts and lengths are u64 in v2/v3 (v1, with u32 lengths, is rejected). Each of the `n`
    /// items takes at least `min_item` bytes, so a count the rest of the file cannot hold is an
    /// error here, before anything is allocated for it.
    fn len(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(self.corrupt(
                at,
                format!(
                    "{what}: {n} items of at least {min_item} bytes each exceed the {left} bytes left in the file"
                ),
            ));
        }
        Ok(n as usize)
    }

    fn corrupt(&self, offset: u64, what: String) -> Error {
        Error::Corrupt {
            path: self.path.to_path_buf(),
            offset,
            what,
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what, 1)?;
        let at = self.pos as u64;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| self.corrupt(at, format!("{what}: invalid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => MetaValue::Bool(self.arr::<1>(key)?[0] != 0),
            8 => MetaValue::String(self.string(key)?),
            9 => {
                let at = self.pos as u64;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(
                        at,
                        format!(
                            "metadata key `{key}`: arrays nested more than {MAX_ARRAY_DEPTH} deep"
                        ),
                    ));
                }
                let elem = self.u32(key)?;
                let n = self.len(key, min_value_size(elem))?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(elem, items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            other => {
                return Err(self.corrupt(
                    self.pos as u64,
                    format!("metadata key `{key}`: unknown value type {other}"),
                ))
            }
        })
    }
}

/// The fewest bytes a metadata value of type `ty` takes in the file (an unknown type fails when
/// its first value is read).
fn min_value_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string's or an array's length (arrays also have their element type).
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

/// The fewest bytes one tensor info takes: name length, dimension count, type, offset.
const MIN_TENSOR_INFO: usize = 8 + 4 + 4 + 8;
/// The fewest bytes one metadata entry takes: key length, value type, a one-byte value.
const MIN_METADATA_ENTRY: usize = 8 + 4 + 1;

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us can only yield wrong values.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Bytes::Mapped(mmap))
    }

    /// Parses a GGUF file held in memory; `path` names it in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(path.as_ref(), Bytes::Owned(bytes))
    }

    fn parse(path: &Path, mmap: Bytes) -> Result<GgufFile> {
        let mut c = Cursor {
            path,
            bytes: &mmap,
            pos: 0,
        };
        let magic: [u8; 4] = c.arr("magic")?;
        if &magic != GGUF_MAGIC {
            return Err(Error::BadMagic {
                path: path.to_path_buf(),
                got: magic,
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::BadVersion {
                path: path.to_path_buf(),
                got: version,
            });
        }
        let n_tensors = c.len("tensor count", MIN_TENSOR_INFO)?;
        let n_kv = c.len("metadata count", MIN_METADATA_ENTRY)?;
        let mut metadata = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.push((key, v));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let at = c.pos as u64;
            let n_dims = c.u32(&name)? as usize;
            if n_dims > 4 {
                return Err(c.corrupt(
                    at,
                    format!("tensor `{name}`: {n_dims} dimensions (at most 4)"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>>>()?;
            let ty = GgmlType::from_id(c.u32(&name)?);
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::MetaType {
                        path: path.to_path_buf(),
                        key: "general.alignment".into(),
                        expected: "a power-of-two integer".into(),
                        got: format!("{v:?}"),
                    })
                }
            },
            None => DEFAULT_ALIGNMENT,
        };
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let f = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            mmap,
        };
        for t in &f.tensors {
            f.tensor_bytes(t)?;
        }
        Ok(f)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn type_err(&self, key: &str, expected: &str, got: &MetaValue) -> Error {
        Error::MetaType {
            path: self.path.clone(),
            key: key.into(),
            expected: expected.into(),
            got: got.type_name().into(),
        }
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingKey {
            path: self.path.clone(),
            key: key.into(),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.type_err(key, "an integer", v))
            })
            .transpose()
    }

    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.type_err(key, "a number", v)))
            .transpose()
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.type_err(key, "a string", v)))
            .transpose()
    }

    pub fn req_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.type_err(key, "a bool", v)))
            .transpose()
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[MetaValue]>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| self.type_err(key, "an array", v))
            })
            .transpose()
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.into(),
            })
    }

    /// The whole mapped file (tensor bytes sit at `data_offset + offset`).
    pub fn mapped(&self) -> &[u8] {
        &self.mmap
    }

    /// The raw (possibly quantized) bytes of a tensor, checked against the file size.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let unsupported = || Error::UnsupportedType {
            path: self.path.clone(),
            tensor: t.name.clone(),
            ty: t.ty.name(),
        };
        let (bs, ts) = t.ty.block().ok_or_else(unsupported)?;
        let corrupt = |what: String| Error::Corrupt {
            path: self.path.clone(),
            offset: self.data_offset.saturating_add(t.offset),
            what,
        };
        // The product of the non-zero dimensions must fit, so that the element count does not
        // overflow in any order (HF order multiplies them reversed): [0, 2^32, 2^32] is refused.
        let nonzero = t
            .dims
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                corrupt(format!(
                    "tensor `{}`: dimensions {:?} overflow a 64-bit element count",
                    t.name, t.dims
                ))
            })?;
        let n = if t.dims.contains(&0) { 0 } else { nonzero };
        let row = t.dims.first().copied().unwrap_or(1);
        if row % bs as u64 != 0 {
            return Err(Error::Shape {
                tensor: t.name.clone(),
                what: format!(
                    "{}: row length {row} is not a multiple of the {} block size {bs}",
                    self.path.display(),
                    t.ty
                ),
            });
        }
        let size = (n / bs as u64).checked_mul(ts as u64);
        let start = self.data_offset.checked_add(t.offset);
        let end = start
            .zip(size)
            .and_then(|(start, size)| start.checked_add(size))
            .filter(|&e| e <= self.mmap.len() as u64);
        let (start, size) = (start.unwrap_or(u64::MAX), size.unwrap_or(u64::MAX));
        match end {
            Some(end) if t.offset.is_multiple_of(self.alignment) => {
                Ok(&self.mmap[start as usize..end as usize])
            }
            Some(_) => Err(Error::Corrupt {
                path: self.path.clone(),
                offset: start,
                what: format!(
                    "tensor `{}` offset {} is not aligned to {}",
                    t.name, t.offset, self.alignment
                ),
            }),
            None => Err(Error::Corrupt {
                path: self.path.clone(),
                offset: start,
                what: format!(
                    "tensor `{}` ({size} bytes) runs past the end of the file",
                    t.name
                ),
            }),
        }
    }

    /// A tensor dequantized to f32 in HF (row-major) shape.
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<HostTensor> {
        if !quants::can_dequantize(t.ty) {
            return Err(Error::UnsupportedType {
                path: self.path.clone(),
                tensor: t.name.clone(),
                ty: t.ty.name(),
            });
        }
        let bytes = self.tensor_bytes(t)?;
        let data = quants::dequantize(t.ty, bytes, t.n_elements() as usize)?;
        Ok(HostTensor::new(t.hf_shape(), data))
    }

    /// Every tensor dequantized, keyed by its GGUF name.
    pub fn all_tensors_f32(&self) -> Result<BTreeMap<String, HostTensor>> {
        self.tensors
            .iter()
            .map(|t| Ok((t.name.clone(), self.tensor_f32(t)?)))
            .collect()
    }
}
