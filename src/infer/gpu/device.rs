//! The engine's device plumbing: owned device memory, its kernels (`decode.cu`, compiled by
//! NVRTC), launches and cuBLAS products on its own stream. Every call here expects the device's
//! primary context to be current: callers run under `cublas::with_state`.

use cudarc::driver::{result as drv, sys};

use crate::backend::cuda::cublas::{BlasState, Gemm, GemmDtype, Operand};
use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::Error;

const SOURCE: &str = concat!(
    include_str!("../../backend/cuda/bf16.cuh"),
    include_str!("decode.cu")
);

pub(super) fn cuda_err(call: &'static str) -> impl Fn(drv::DriverError) -> Error {
    move |e| Error::Cuda {
        call,
        detail: format!("{e:?}"),
    }
}

/// Device memory owned by the engine; freed when dropped.
pub(super) struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
    ordinal: usize,
}

impl DevBuf {
    /// `bytes` of uninitialised memory on device `ordinal`.
    pub fn new(ordinal: usize, bytes: usize) -> Result<Self, Error> {
        crate::backend::cuda::cublas::with_state(ordinal, |_| {
            // SAFETY: a plain allocation on the context `with_state` made current.
            let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }.map_err(cuda_err("cuMemAlloc"))?;
            Ok(Self {
                ptr,
                bytes,
                ordinal,
            })
        })
    }

    /// A buffer holding `data`.
    pub fn from_host<T>(ordinal: usize, data: &[T]) -> Result<Self, Error> {
        let buf = Self::new(ordinal, std::mem::size_of_val(data))?;
        crate::backend::cuda::cublas::with_state(ordinal, |_| {
            // SAFETY: `buf` holds exactly `data`'s bytes; the copy completes before returning.
            unsafe { drv::memcpy_htod_sync(buf.ptr, data) }.map_err(cuda_err("cuMemcpyHtoD"))
        })?;
        Ok(buf)
    }

    /// The address `elements` values of `elem_bytes` into the buffer.
    pub fn at(&self, elements: usize, elem_bytes: usize) -> u64 {
        debug_assert!(elements * elem_bytes <= self.bytes);
        self.ptr + (elements * elem_bytes) as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let ptr = self.ptr;
        let _ = crate::backend::cuda::cublas::with_state(self.ordinal, |_| {
            // SAFETY: the engine's own allocation; its stream has been synchronised before any
            // owner drops it (sessions synchronise on every step and on drop).
            unsafe { drv::free_sync(ptr) }.map_err(cuda_err("cuMemFree"))
        });
    }
}

/// The element type the engine computes in (the model's weights'): bf16 or f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Elem {
    Bf16,
    F32,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }

    pub fn gemm(self) -> GemmDtype {
        match self {
            Self::Bf16 => GemmDtype::Bf16,
            Self::F32 => GemmDtype::F32,
        }
    }
}

/// The kernels of `decode.cu` for one element type.
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    pub embed: sys::CUfunction,
    pub add_norm: sys::CUfunction,
    pub qkv_post: sys::CUfunction,
    pub attend: sys::CUfunction,
    pub silu_mul: sys::CUfunction,
    pub gather_rows: sys::CUfunction,
    pub pick: sys::CUfunction,
}

// SAFETY: CUfunction handles are plain driver handles, valid in every thread of the process.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

const KERNELS: [&str; 7] = [
    "embed",
    "add_norm",
    "qkv_post",
    "attend",
    "silu_mul",
    "gather_rows",
    "pick",
];

/// Threads of `attend`'s blocks (`32 * ATTN_WARPS` in decode.cu) and the largest head size
/// (`MAX_HEAD_DIM`).
pub(super) const ATTEND_THREADS: u32 = 256;
pub(super) const MAX_HEAD_DIM: usize = 256;

impl Kernels {
    /// Compiles (once per process) and returns the kernels for `elem` on device `ordinal`.
    pub fn load(ordinal: usize, elem: Elem) -> Result<Self, Error> {
        let names: Vec<String> = ["bf16", "f32"]
            .iter()
            .flat_map(|suffix| KERNELS.iter().map(move |k| format!("runner_{k}_{suffix}")))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let all = nvrtc::kernels(ordinal, SOURCE, "decode.cu", &[], &names)?.0;
        let base = match elem {
            Elem::Bf16 => 0,
            Elem::F32 => KERNELS.len(),
        };
        let f = |i: usize| all[base + i];
        Ok(Self {
            embed: f(0),
            add_norm: f(1),
            qkv_post: f(2),
            attend: f(3),
            silu_mul: f(4),
            gather_rows: f(5),
            pick: f(6),
        })
    }
}

/// Launches `f` on `stream` with a grid of `grid` blocks of `threads` threads.
///
/// # Safety
/// `args` must match the kernel's parameters and its pointers address live device memory of the
/// sizes the kernel reads and writes.
pub(super) unsafe fn launch(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    threads: u32,
    stream: sys::CUstream,
    args: &mut Args,
    what: &'static str,
) -> Result<(), Error> {
    let mut params = args.pointers();
    drv::launch_kernel(f, grid, (threads, 1, 1), 0, stream, &mut params).map_err(|e| Error::Cuda {
        call: "cuLaunchKernel",
        detail: format!("{what}: {e:?}"),
    })
}

/// `y [n, out] = x [n, in] · w [out, in]ᵀ` (row-major, all of `elem`), on `stream`.
///
/// # Safety
/// The pointers must address live device memory of those shapes.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn linear(
    blas: &mut BlasState,
    stream: sys::CUstream,
    elem: Elem,
    x: u64,
    n: usize,
    w: u64,
    in_features: usize,
    out_features: usize,
    y: u64,
) -> Result<(), Error> {
    let (n64, i64_, o64) = (n as u64, in_features as u64, out_features as u64);
    let gemm = Gemm {
        dtype: elem.gemm(),
        m: o64,
        n: n64,
        k: i64_,
        batch: 1,
        a: Operand {
            ptr: w,
            rows: i64_,
            cols: o64,
            ld: in_features as i64,
            batch_stride: (in_features * out_features) as i64,
            transposed: true,
        },
        b: Operand {
            ptr: x,
            rows: i64_,
            cols: n64,
            ld: in_features as i64,
            batch_stride: (in_features * n) as i64,
            transposed: false,
        },
        d_ptr: y,
        ldd: out_features as i64,
        d_batch_stride: (out_features * n) as i64,
        alpha: 1.0,
        beta: 0.0,
    };
    blas.enqueue(stream, &gemm)
}

/// The engine's stream on device `ordinal` (non-blocking), created on first use and kept for
/// the life of the process: cuBLAS keeps a workspace per stream it has run on, so a stream per
/// session would leave one behind for every GRPO rollout.
pub(super) fn engine_stream(ordinal: usize) -> Result<sys::CUstream, Error> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static STREAMS: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    let streams = STREAMS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = streams.lock().map_err(|_| Error::Poisoned)?;
    if let Some(&raw) = guard.get(&ordinal) {
        return Ok(raw as sys::CUstream);
    }
    let raw = crate::backend::cuda::cublas::with_state(ordinal, |_| {
        drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(cuda_err("cuStreamCreate"))
    })?;
    guard.insert(ordinal, raw as usize);
    Ok(raw)
}

/// Waits for everything queued on `stream`.
pub(super) fn sync(stream: sys::CUstream) -> Result<(), Error> {
    // SAFETY: the engine's stream lives as long as the process.
    unsafe { drv::stream::synchronize(stream) }.map_err(cuda_err("cuStreamSynchronize"))
}

/// A captured decode step (`cuGraphInstantiate`), replayed with `cuGraphLaunch`.
pub(super) struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    ordinal: usize,
}

impl Graph {
    /// Records what `body` queues on `stream` into a graph instead of running it.
    pub fn capture(
        ordinal: usize,
        blas: &mut BlasState,
        stream: sys::CUstream,
        body: impl FnOnce(&mut BlasState) -> Result<(), Error>,
    ) -> Result<Self, Error> {
        // SAFETY: capture of the engine's own stream; `end_capture` always follows.
        unsafe {
            drv::stream::begin_capture(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(cuda_err("cuStreamBeginCapture"))?;
            let queued = body(blas);
            let graph = drv::stream::end_capture(stream).map_err(cuda_err("cuStreamEndCapture"));
            queued?;
            let graph = graph?;
            match drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) {
                Ok(exec) => Ok(Self {
                    graph,
                    exec,
                    ordinal,
                }),
                Err(e) => {
                    let _ = drv::graph::destroy(graph);
                    Err(cuda_err("cuGraphInstantiate")(e))
                }
            }
        }
    }

    /// Queues one replay on `stream`.
    pub fn launch(&self, stream: sys::CUstream) -> Result<(), Error> {
        // SAFETY: a live instantiated graph whose buffers its owner keeps alive.
        unsafe { drv::graph::launch(self.exec, stream) }.map_err(cuda_err("cuGraphLaunch"))
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let (graph, exec) = (self.graph, self.exec);
        let _ = crate::backend::cuda::cublas::with_state(self.ordinal, |_| {
            // SAFETY: the graph's launches were synchronised by its session.
            unsafe {
                let _ = drv::graph::exec_destroy(exec);
                drv::graph::destroy(graph)
            }
            .map_err(cuda_err("cuGraphDestroy"))
        });
    }
}

/// A null pointer argument (an absent bias or norm).
pub(super) fn opt_ptr(buf: Option<&DevBuf>) -> u64 {
    buf.map_or(0, |b| b.ptr)
}

/// Copies `bytes` from `src` to `dst` on `stream`.
///
/// # Safety
/// Both ranges must be live device memory.
pub(super) unsafe fn copy(
    dst: u64,
    src: u64,
    bytes: usize,
    stream: sys::CUstream,
) -> Result<(), Error> {
    drv::memcpy_dtod_async(dst, src, bytes, stream).map_err(cuda_err("cuMemcpyDtoDAsync"))
}

/// Copies host `data` to `dst` on `stream` (pageable memory: staged before this returns).
///
/// # Safety
/// `dst` must hold `data`.
pub(super) unsafe fn upload<T>(dst: u64, data: &[T], stream: sys::CUstream) -> Result<(), Error> {
    if data.is_empty() {
        return Ok(());
    }
    drv::memcpy_htod_async(dst, data, stream).map_err(cuda_err("cuMemcpyHtoDAsync"))
}

/// Copies device memory at `src` into `out` and waits for it (and for the stream before it).
///
/// # Safety
/// `src` must hold `out`'s bytes.
pub(super) unsafe fn download<T>(
    out: &mut [T],
    src: u64,
    stream: sys::CUstream,
) -> Result<(), Error> {
    if out.is_empty() {
        return drv::stream::synchronize(stream).map_err(cuda_err("cuStreamSynchronize"));
    }
    drv::memcpy_dtoh_async(out, src, stream).map_err(cuda_err("cuMemcpyDtoHAsync"))?;
    drv::stream::synchronize(stream).map_err(cuda_err("cuStreamSynchronize"))
}
