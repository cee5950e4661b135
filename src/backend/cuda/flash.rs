//! Fused attention on burn-cuda tensors: the FlashAttention-2 kernels of `flash_attention.cu`,
//! compiled once per process by NVRTC for the device's architecture and queued on cubecl's
//! stream like the cuBLAS GEMMs (see `cube.rs`). bf16 operands, head dim 64 or 128, sm_80+.
//!
//! The forward pass keeps the log-sum-exp of every query row (f32) instead of the score matrix;
//! the backward pass recomputes the probabilities tile by tile from it.
//!
//! `forward` and `backward` first offer the call to cuDNN's fused SDPA (`cudnn_attention`),
//! which takes causal attention over equal lengths without padding where libcudnn loads; the
//! kernels here serve the rest (padding, prefill after a cache, decoding).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::tensor::{DType, FloatDType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, tensor::CubeTensor, CubeBackend, FloatElement,
    IntElement,
};
use cubecl::cuda::CudaRuntime;
use cudarc::driver::sys as drv_sys;

use crate::backend::cuda::cudnn_attention;
use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::{Error, FusedAttentionSpec};

const SOURCE: &str = include_str!("flash_attention.cu");
/// Threads of a forward block (four warps).
const FWD_THREADS: u32 = 128;
/// Query rows of a backward tile.
const TILE: usize = 64;

// Tile shapes per head size. They reach the kernels as NVRTC defines (`tile_defines`), so the
// grid, block and shared-memory sizes here and the kernels' loops cannot disagree.

/// Row tiles of 16 each forward warp owns: two at head dim 64 (one K/V fragment feeds two
/// `mma`), one at 128, where two would spill registers.
fn fwd_row_tiles(d: usize) -> usize {
    if d == 64 {
        2
    } else {
        1
    }
}

/// Query rows of a forward block: 16 per warp and row tile.
fn fwd_rows(d: usize) -> usize {
    16 * (FWD_THREADS as usize / 32) * fwd_row_tiles(d)
}

/// Keys of a backward block, 16 per warp: 128 at head dim 64 (half the dQ atomics per
/// product), 64 at 128, where 128 would not fit twice an SM's shared memory.
fn bwd_keys(d: usize) -> usize {
    if d == 64 {
        2 * TILE
    } else {
        TILE
    }
}

fn tile_defines() -> Vec<String> {
    let threads = format!("-DFWD_THREADS={FWD_THREADS}");
    std::iter::once(threads)
        .chain(HEAD_DIMS.iter().flat_map(|&d| {
            [
                format!("-DFWD_ROW_TILES_D{d}={}", fwd_row_tiles(d)),
                format!("-DBWD_KEYS_D{d}={}", bwd_keys(d)),
            ]
        }))
        .collect()
}

fn bwd_threads(d: usize) -> u32 {
    (bwd_keys(d) / 16 * 32) as u32
}

/// Head sizes the kernels are instantiated for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

struct Kernels {
    fwd: [drv_sys::CUfunction; 2],
    bwd: [drv_sys::CUfunction; 2],
}

// SAFETY: CUfunction handles are plain driver handles, valid in every thread of the process.
unsafe impl Send for Kernels {}

/// Q, two K/V buffers and two key-validity rows.
fn fwd_smem(d: usize) -> usize {
    (fwd_rows(d) + 4 * TILE) * (d + 8) * 2 + 2 * TILE * 4
}

/// K, V, two Q/dO buffers, dS^T, two lse/delta buffers and key validity.
fn bwd_smem(d: usize) -> usize {
    let keys = bwd_keys(d);
    (2 * keys + 4 * TILE) * (d + 8) * 2 + keys * (TILE + 8) * 2 + (4 * TILE + keys) * 4
}

fn load(ordinal: usize) -> Result<Kernels, Error> {
    crate::backend::cuda::cublas::with_state(ordinal, |_| {
        let (major, minor) = nvrtc::compute_capability(ordinal)?;
        if major < 8 {
            return Err(Error::Cuda {
                call: "flash attention",
                detail: format!(
                    "needs compute capability 8.0 or newer, the device has {major}.{minor}"
                ),
            });
        }
        let mut flags = tile_defines();
        // Extra NVRTC flags, for measuring (e.g. `--use_fast_math`).
        if let Ok(extra) = std::env::var("RUNNER_FLASH_NVRTC_FLAGS") {
            flags.extend(extra.split_whitespace().map(String::from));
        }
        let module = nvrtc::load_module(ordinal, SOURCE, "flash_attention.cu", flags)?;
        Ok(Kernels {
            fwd: [
                nvrtc::function(module, "runner_flash_fwd_d64", fwd_smem(64))?,
                nvrtc::function(module, "runner_flash_fwd_d128", fwd_smem(128))?,
            ],
            bwd: [
                nvrtc::function(module, "runner_flash_bwd_d64", bwd_smem(64))?,
                nvrtc::function(module, "runner_flash_bwd_d128", bwd_smem(128))?,
            ],
        })
    })
}

type Loaded = Result<Kernels, String>;

static KERNELS: OnceLock<Mutex<HashMap<usize, Loaded>>> = OnceLock::new();

/// Runs `f` with the kernels of device `ordinal`, compiling them on first use.
fn with_kernels<T>(
    ordinal: usize,
    f: impl FnOnce(&Kernels) -> Result<T, Error>,
) -> Result<T, Error> {
    let all = KERNELS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = all.lock().map_err(|_| Error::Poisoned)?;
    let entry = guard
        .entry(ordinal)
        .or_insert_with(|| load(ordinal).map_err(|e| e.to_string()));
    match entry {
        Ok(k) => f(k),
        Err(e) => Err(Error::Cuda {
            call: "flash attention kernels",
            detail: e.clone(),
        }),
    }
}

/// Whether the fused kernels run here for `dtype` and `head_dim` (compiles them on first ask;
/// a failure is reported once and the caller uses the composed attention).
pub fn available(dtype: DType, head_dim: usize) -> bool {
    if dtype != DType::BF16 || !HEAD_DIMS.contains(&head_dim) {
        return false;
    }
    // Read once: this is asked on every forward pass and every attention call.
    static TURNED_OFF: OnceLock<bool> = OnceLock::new();
    if *TURNED_OFF
        .get_or_init(|| std::env::var("RUNNER_FUSED_ATTENTION").is_ok_and(|v| v.trim() == "0"))
    {
        return false;
    }
    match with_kernels(0, |_| Ok(())) {
        Ok(()) => true,
        Err(e) => {
            warn_once(&e);
            false
        }
    }
}

fn warn_once(err: &Error) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("runner backend: fused attention unavailable, using composed attention ({err})");
    }
}

type Cube<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;
type CT = CubeTensor<CudaRuntime>;

/// A rank-4 bf16 tensor the kernels can address: last axis contiguous, rows 16-byte aligned.
fn addressable(t: CT) -> CT {
    let ok = {
        let strides = t.meta.strides();
        strides[3] == 1 && strides[..3].iter().all(|s| s % 8 == 0)
    };
    if ok {
        t
    } else {
        // A fresh contiguous copy (`into_contiguous` returns contiguous tensors untouched).
        into_contiguous(t)
    }
}

fn strides3(t: &CT) -> [i64; 3] {
    let s = t.meta.strides();
    [s[0] as i64, s[1] as i64, s[2] as i64]
}

fn shape_err(what: &'static str, expected: String, got: String) -> Error {
    Error::Shape {
        op: "fused attention",
        what,
        expected,
        got,
    }
}

struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    k_len: usize,
    head_dim: usize,
}

impl Dims {
    fn shape(&self) -> cudnn_attention::Shape {
        cudnn_attention::Shape {
            batch: self.batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            q_len: self.q_len,
            k_len: self.k_len,
            head_dim: self.head_dim,
        }
    }

    /// The kernels' `H, KVH, T, S` arguments.
    fn kernel_sizes(&self) -> Result<[i32; 4], Error> {
        Ok([
            int(self.heads, "heads")?,
            int(self.kv_heads, "kv heads")?,
            int(self.q_len, "q_len")?,
            int(self.k_len, "k_len")?,
        ])
    }
}

fn dims(q: &CT, k: &CT, v: &CT) -> Result<Dims, Error> {
    let (qs, ks, vs) = (q.meta.shape(), k.meta.shape(), v.meta.shape());
    let d = Dims {
        batch: qs[0],
        heads: qs[1],
        kv_heads: ks[1],
        q_len: qs[2],
        k_len: ks[2],
        head_dim: qs[3],
    };
    if ks[0] != d.batch || ks[3] != d.head_dim || ks != vs {
        return Err(shape_err(
            "k/v shape",
            format!("[{}, kv_heads, k_len, {}] for both", d.batch, d.head_dim),
            format!("k {:?}, v {:?}", ks, vs),
        ));
    }
    if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) || d.k_len < d.q_len || d.q_len == 0 {
        return Err(shape_err(
            "heads / lengths",
            "q_heads a multiple of kv_heads, 0 < q_len <= k_len".into(),
            format!("q {:?}, k {:?}", qs, ks),
        ));
    }
    Ok(d)
}

/// An uninitialised contiguous tensor on `like`'s device.
pub(super) fn empty(like: &CT, shape: Vec<usize>, dtype: DType) -> CT {
    let bytes = shape.iter().product::<usize>() * dtype.size();
    let handle = like.client.empty(bytes.max(1));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        handle,
        dtype,
    )
}

fn int(v: usize, what: &'static str) -> Result<i32, Error> {
    i32::try_from(v).map_err(|_| shape_err(what, "at most i32::MAX".into(), v.to_string()))
}

/// Queues `kernel` with arguments built from the tensors' device pointers (see
/// [`nvrtc::launch`]). The kernels are loaded here first, so a machine where they do not
/// compile gets the error now and the composed ops.
fn launch(
    ordinal: usize,
    tensors: &[&CT],
    kernel: impl FnOnce(&Kernels) -> drv_sys::CUfunction,
    grid: (u32, u32, u32),
    threads: u32,
    smem: usize,
    args: impl FnOnce(&[u64]) -> Args + Send + 'static,
) -> Result<(), Error> {
    let function = with_kernels(ordinal, |k| Ok(kernel(k)))?;
    let handles = tensors.iter().map(|t| t.handle.clone()).collect();
    let client = &tensors.last().expect("at least one tensor").client;
    nvrtc::launch(
        ordinal,
        client,
        handles,
        "flash attention",
        function,
        (grid, threads, smem),
        args,
    );
    Ok(())
}

fn kernel_index(head_dim: usize) -> usize {
    usize::from(head_dim == 128)
}

fn check_mask(mask: Option<CT>, d: &Dims) -> Result<Option<CT>, Error> {
    let mask = mask.map(into_contiguous);
    if let Some(m) = &mask {
        if m.dtype != DType::I32 || m.meta.shape().to_vec() != vec![d.batch, d.k_len] {
            return Err(shape_err(
                "key mask",
                format!("i32 [{}, {}]", d.batch, d.k_len),
                format!("{:?} {:?}", m.dtype, m.meta.shape()),
            ));
        }
    }
    Ok(mask)
}

/// `(o [b, t, h, d], lse [b, h, t] f32)` for bf16 `q [b, h, t, d]`, `k`, `v [b, kvh, s, d]`;
/// `key_valid [b, s]` i32 (0 = never attend).
pub fn forward(
    q: CT,
    k: CT,
    v: CT,
    key_valid: Option<CT>,
    spec: FusedAttentionSpec,
) -> Result<(CT, CT), Error> {
    let d = dims(&q, &k, &v)?;
    let (q, k, v) = (addressable(q), addressable(k), addressable(v));
    let key_valid = check_mask(key_valid, &d)?;
    if cudnn_attention::applies(&d.shape(), spec.causal, key_valid.is_some()) {
        if let Some(out) = cudnn_attention::forward(&q, &k, &v, d.shape(), spec.scale) {
            return Ok(out);
        }
    }
    let o = empty(&q, vec![d.batch, d.q_len, d.heads, d.head_dim], DType::BF16);
    let lse = empty(&q, vec![d.batch, d.heads, d.q_len], DType::F32);
    let rows = d.heads / d.kv_heads * d.q_len;
    let grid = (
        int(rows.div_ceil(fwd_rows(d.head_dim)), "query tiles")? as u32,
        d.kv_heads as u32,
        d.batch as u32,
    );
    let (qs, ks, vs) = (strides3(&q), strides3(&k), strides3(&v));
    // o is [b, t, h, d]: its batch, head and position strides.
    let os = [
        (d.q_len * d.heads * d.head_dim) as i64,
        d.head_dim as i64,
        (d.heads * d.head_dim) as i64,
    ];
    let sizes = d.kernel_sizes()?;
    let mut tensors: Vec<&CT> = vec![&q, &k, &v, &lse];
    if let Some(m) = &key_valid {
        tensors.push(m);
    }
    tensors.push(&o);
    let has_mask = key_valid.is_some();
    let idx = kernel_index(d.head_dim);
    launch(
        q.device.index,
        &tensors,
        |kern| kern.fwd[idx],
        grid,
        FWD_THREADS,
        fwd_smem(d.head_dim),
        move |p| {
            let mask = if has_mask { p[4] } else { 0 };
            let mut a = Args::default();
            a.ptr(p[0])
                .ptr(p[1])
                .ptr(p[2])
                .ptr(*p.last().unwrap())
                .ptr(p[3])
                .ptr(mask);
            for v in sizes {
                a.i32(v);
            }
            for v in qs.into_iter().chain(ks).chain(vs).chain(os) {
                a.i64(v);
            }
            a.f32(spec.scale as f32).i32(i32::from(spec.causal));
            a
        },
    )?;
    Ok((o, lse))
}

/// Gradients `(dq, dk, dv)`, shaped and typed as `q`, `k`, `v`, from the forward's `o` and `lse`
/// and the output gradient `dout [b, t, h, d]`.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: FloatElement, I: IntElement, BT: BoolElement>(
    q: CT,
    k: CT,
    v: CT,
    o: CT,
    lse: CT,
    dout: CT,
    key_valid: Option<CT>,
    spec: FusedAttentionSpec,
) -> Result<(CT, CT, CT), Error> {
    let d = dims(&q, &k, &v)?;
    let (q, k, v) = (addressable(q), addressable(k), addressable(v));
    let key_valid = check_mask(key_valid, &d)?;
    let dout = addressable(dout);
    let lse = into_contiguous(lse);
    if cudnn_attention::applies(&d.shape(), spec.causal, key_valid.is_some()) {
        let o = addressable(o.clone());
        if let Some(grads) = cudnn_attention::backward::<F, I, BT>(
            &q,
            &k,
            &v,
            &o,
            &lse,
            &dout,
            d.shape(),
            spec.scale,
        ) {
            return Ok(grads);
        }
    }
    // delta = rowsum(dO * O) per query row, [b, h, t] f32 (burn's fused kernels).
    let float4 = |t: CT| Tensor::<Cube<F, I, BT>, 4>::from_primitive(TensorPrimitive::Float(t));
    let delta = (float4(dout.clone()).cast(FloatDType::F32) * float4(o).cast(FloatDType::F32))
        .sum_dim(3)
        .reshape([d.batch, d.q_len, d.heads])
        .swap_dims(1, 2)
        .into_primitive()
        .tensor();
    let delta = into_contiguous(delta);
    let zeros = |shape: [usize; 4]| {
        Tensor::<Cube<F, I, BT>, 4>::zeros(shape, (&q.device, DType::F32))
            .into_primitive()
            .tensor()
    };
    // f32 accumulators: dQ over key tiles, dK and dV over the query heads of a KV head.
    let dq_acc = zeros([d.batch, d.heads, d.q_len, d.head_dim]);
    let dk_acc = zeros([d.batch, d.kv_heads, d.k_len, d.head_dim]);
    let dv_acc = zeros([d.batch, d.kv_heads, d.k_len, d.head_dim]);
    let grid = (
        int(d.k_len.div_ceil(bwd_keys(d.head_dim)), "key tiles")? as u32,
        d.heads as u32,
        d.batch as u32,
    );
    let (qs, ks, vs) = (strides3(&q), strides3(&k), strides3(&v));
    // dout is [b, t, h, d] (possibly strided): batch, head and position strides.
    let ds = {
        let s = dout.meta.strides();
        [s[0] as i64, s[2] as i64, s[1] as i64]
    };
    let sizes = d.kernel_sizes()?;
    let mut tensors: Vec<&CT> = vec![&q, &k, &v, &dout, &lse, &delta, &dq_acc, &dk_acc];
    if let Some(m) = &key_valid {
        tensors.push(m);
    }
    tensors.push(&dv_acc);
    let has_mask = key_valid.is_some();
    let idx = kernel_index(d.head_dim);
    launch(
        q.device.index,
        &tensors,
        |kern| kern.bwd[idx],
        grid,
        bwd_threads(d.head_dim),
        bwd_smem(d.head_dim),
        move |p| {
            let mask = if has_mask { p[8] } else { 0 };
            let mut a = Args::default();
            for &ptr in &p[..6] {
                a.ptr(ptr);
            }
            a.ptr(mask).ptr(p[6]).ptr(p[7]).ptr(*p.last().unwrap());
            for v in sizes {
                a.i32(v);
            }
            for v in qs.into_iter().chain(ks).chain(vs).chain(ds) {
                a.i64(v);
            }
            a.f32(spec.scale as f32).i32(i32::from(spec.causal));
            a
        },
    )?;
    let to_bf16 = |t: CT| {
        Tensor::<Cube<F, I, BT>, 4>::from_primitive(TensorPrimitive::Float(t))
            .cast(FloatDType::BF16)
            .into_primitive()
            .tensor()
    };
    Ok((to_bf16(dq_acc), to_bf16(dk_acc), to_bf16(dv_acc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defines_cover_every_tile_shape_the_kernels_require() {
        let required: Vec<&str> = SOURCE
            .split("defined(")
            .skip(1)
            .filter_map(|rest| rest.split(')').next())
            .collect();
        assert_eq!(required.len(), 5, "{required:?}");
        let defines = tile_defines();
        for name in required {
            assert!(
                defines.iter().any(|d| d.starts_with(&format!("-D{name}="))),
                "{name} missing from {defines:?}"
            );
        }
        // The launch sizes follow the same shapes.
        assert_eq!(fwd_rows(64), 128);
        assert_eq!(bwd_threads(64), 256);
        assert_eq!(bwd_threads(128), 128);
    }
}
