//! GGUF v3 writer: metadata, tensor infos, data aligned to `general.alignment` (32), written to a
//! temporary file beside the target and renamed into place. Reference: ggml/docs/gguf.md,
//! gguf-py/gguf/gguf_writer.py.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::gguf::{quants, Error, GgmlType, MetaValue, Result, DEFAULT_ALIGNMENT, GGUF_MAGIC};

struct PendingTensor {
    name: String,
    /// ggml order (row length first).
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then writes one GGUF v3 file.
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
    alignment: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Sets (or replaces) a metadata key, keeping first-insertion order.
    pub fn set(&mut self, key: &str, value: MetaValue) {
        if key == "general.alignment" {
            if let Some(a) = value.as_u64().filter(|a| a.is_power_of_two()) {
                self.alignment = a;
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Adds a tensor already encoded as `ty`; `hf_shape` is row-major (PyTorch order).
    pub fn add_tensor_bytes(
        &mut self,
        name: &str,
        hf_shape: &[usize],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<()> {
        let n: usize = hf_shape.iter().product();
        let row = hf_shape.last().copied().unwrap_or(1);
        let shape_err = |what: String| Error::Shape {
            tensor: name.to_string(),
            what,
        };
        let (bs, _) = ty
            .block()
            .ok_or_else(|| shape_err(format!("type {ty} cannot be written")))?;
        if row % bs != 0 {
            return Err(shape_err(format!(
                "row length {row} is not a multiple of the {ty} block size {bs}"
            )));
        }
        let expected = quants::byte_size(ty, n)
            .ok_or_else(|| shape_err(format!("{n} elements do not fill {ty} blocks")))?;
        if data.len() != expected {
            return Err(shape_err(format!(
                "{ty} data of {n} elements must be {expected} bytes, got {}",
                data.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(shape_err("duplicate tensor name".into()));
        }
        let dims = hf_shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims,
            ty,
            data,
        });
        Ok(())
    }

    /// Quantizes f32 data to `ty` and adds it.
    pub fn add_tensor_f32(
        &mut self,
        name: &str,
        hf_shape: &[usize],
        ty: GgmlType,
        data: &[f32],
    ) -> Result<()> {
        let bytes = quants::quantize(ty, data)?;
        self.add_tensor_bytes(name, hf_shape, ty, bytes)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = (&str, GgmlType)> {
        self.tensors.iter().map(|t| (t.name.as_str(), t.ty))
    }

    /// Writes the file atomically (temporary file in the same folder, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out.gguf".into());
        let tmp: PathBuf = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
        let result = self.write_to(&tmp);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    fn write_to(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut w = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
        let mut header = Vec::new();
        header.extend_from_slice(GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut header, k);
            header.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut header, v);
        }
        let align = self.alignment;
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.data.len() as u64).div_ceil(align) * align;
        }
        pad_to(&mut header, align);
        w.write_all(&header).map_err(io)?;
        let zeros = vec![0u8; align as usize];
        for t in &self.tensors {
            w.write_all(&t.data).map_err(io)?;
            let pad = (t.data.len() as u64).div_ceil(align) * align - t.data.len() as u64;
            w.write_all(&zeros[..pad as usize]).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    }
}

fn pad_to(buf: &mut Vec<u8>, align: u64) {
    let len = buf.len() as u64;
    buf.resize((len.div_ceil(align) * align) as usize, 0);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => buf.push(*x),
        MetaValue::I8(x) => buf.push(*x as u8),
        MetaValue::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => buf.push(*x as u8),
        MetaValue::String(s) => put_str(buf, s),
        MetaValue::Array(elem, items) => {
            buf.extend_from_slice(&elem.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(buf, it);
            }
        }
        MetaValue::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
    }
}
