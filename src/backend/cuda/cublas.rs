//! Strided batched GEMM through cuBLAS (`cublasGemmStridedBatchedEx`) on raw device pointers:
//! bf16, f16 and f32 operands, f32 accumulation.
//!
//! Reference: cuBLAS `cublasGemmStridedBatchedEx` (docs.nvidia.com/cuda/cublas). cuBLAS's
//! heuristic answered CUBLAS_STATUS_NOT_SUPPORTED on the H100 for these layouts, while the
//! classic API on the same memory reached PyTorch's speed (design.md), so the classic API it is.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas, sys};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext};

use crate::backend::Error;

/// Element types the GEMM accepts (A, B and D share one type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmDtype {
    Bf16,
    F16,
    F32,
}

impl GemmDtype {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Self::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            Self::F16 => sys::cudaDataType_t::CUDA_R_16F,
            Self::F32 => sys::cudaDataType_t::CUDA_R_32F,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// One operand in cuBLAS's column-major terms: `rows x cols` as stored, `ld` its leading
/// dimension, `transposed` whether the GEMM reads it as `op(X) = X^T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Operand {
    pub ptr: u64,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub batch_stride: i64,
    pub transposed: bool,
}

/// `D[b] = op(A[b]) * op(B[b])` in column-major terms, `D` is `m x n` with leading dim `ldd`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub dtype: GemmDtype,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub batch: i32,
    pub a: Operand,
    pub b: Operand,
    pub d_ptr: u64,
    pub ldd: i64,
    pub d_batch_stride: i64,
    /// `D = alpha op(A) op(B) + beta D`: beta 1 adds the product into what `D` holds.
    pub alpha: f32,
    pub beta: f32,
}

/// Process-wide cuBLAS state for one device: the handle and one workspace per stream the GEMMs
/// are queued on (GEMMs on two streams may overlap, so they must not share scratch memory).
pub struct BlasState {
    ctx: Arc<CudaContext>,
    handle: sys::cublasHandle_t,
    workspaces: HashMap<usize, u64>,
}

// SAFETY: the raw handles are only used under the global mutex below.
unsafe impl Send for BlasState {}

const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_err(what: &'static str) -> impl Fn(blas::CublasError) -> Error {
    move |e| Error::Cuda {
        call: what,
        detail: format!("{e:?}"),
    }
}

fn drv_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        call: what,
        detail: format!("{e:?}"),
    }
}

static STATES: OnceLock<Mutex<HashMap<usize, BlasState>>> = OnceLock::new();

/// Runs `f` with the cuBLAS state of device `ordinal`, creating it on first use.
pub fn with_state<T>(
    ordinal: usize,
    f: impl FnOnce(&mut BlasState) -> Result<T, Error>,
) -> Result<T, Error> {
    let states = STATES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = states.lock().map_err(|_| Error::Poisoned)?;
    let state = match guard.entry(ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(BlasState::new(ordinal)?),
    };
    state
        .ctx
        .bind_to_thread()
        .map_err(drv_err("cuCtxSetCurrent"))?;
    f(state)
}

/// Whether cuBLAS loads on device `ordinal` (creating its state on the first call); checked on
/// the calling thread before a GEMM is queued, so a machine without it falls back to burn's ops.
pub fn ready(ordinal: usize) -> Result<(), Error> {
    use std::sync::atomic::{AtomicU64, Ordering};
    // One bit per device ordinal below 64 that has answered; others ask every time.
    static READY: AtomicU64 = AtomicU64::new(0);
    let bit = 1u64.checked_shl(ordinal as u32).unwrap_or(0);
    if bit != 0 && READY.load(Ordering::Relaxed) & bit != 0 {
        return Ok(());
    }
    with_state(ordinal, |_| Ok(()))?;
    READY.fetch_or(bit, Ordering::Relaxed);
    Ok(())
}

fn op(transposed: bool) -> sys::cublasOperation_t {
    if transposed {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn int(v: u64, what: &'static str) -> Result<i32, Error> {
    i32::try_from(v).map_err(|_| Error::Shape {
        op: "cublas gemm",
        what,
        expected: "at most i32::MAX".into(),
        got: v.to_string(),
    })
}

impl BlasState {
    fn new(ordinal: usize) -> Result<Self, Error> {
        // The primary context is the one cubecl runs on, so its pointers are valid here.
        let ctx = CudaContext::new(ordinal).map_err(drv_err("cuDevicePrimaryCtxRetain"))?;
        ctx.bind_to_thread().map_err(drv_err("cuCtxSetCurrent"))?;
        let handle = blas::create_handle().map_err(blas_err("cublasCreate"))?;
        Ok(Self {
            ctx,
            handle,
            workspaces: HashMap::new(),
        })
    }

    /// Points the handle at `stream` and at that stream's workspace, allocated on first use.
    fn bind_stream(&mut self, stream: drv_sys::CUstream) -> Result<(), Error> {
        let workspace = match self.workspaces.get(&(stream as usize)) {
            Some(&w) => w,
            None => {
                // SAFETY: plain allocation on the bound context, kept for the life of the
                // process (a stream's workspace may be read by GEMMs still in its queue).
                let w =
                    unsafe { drv::malloc_sync(WORKSPACE_BYTES) }.map_err(drv_err("cuMemAlloc"))?;
                self.workspaces.insert(stream as usize, w);
                w
            }
        };
        // SAFETY: handle, stream and workspace are alive and belong to this context.
        unsafe {
            blas::set_stream(self.handle, stream as sys::cudaStream_t)
                .map_err(blas_err("cublasSetStream"))?;
            sys::cublasSetWorkspace_v2(self.handle, workspace as *mut c_void, WORKSPACE_BYTES)
                .result()
                .map_err(blas_err("cublasSetWorkspace"))?;
        }
        Ok(())
    }

    /// Queues the GEMM on `stream` (does not wait for it).
    ///
    /// # Safety
    /// The pointers must address live device memory of the sizes the operands describe, written
    /// by work queued earlier on `stream` (or finished), and not reused until this GEMM has run:
    /// later work on the same stream is ordered after it; other streams must wait for it.
    pub unsafe fn enqueue(&mut self, stream: drv_sys::CUstream, g: &Gemm) -> Result<(), Error> {
        self.bind_stream(stream)?;
        let (alpha, beta) = (g.alpha, g.beta);
        let ty = g.dtype.cuda();
        blas::gemm_strided_batched_ex(
            self.handle,
            op(g.a.transposed),
            op(g.b.transposed),
            int(g.m, "m")?,
            int(g.n, "n")?,
            int(g.k, "k")?,
            (&alpha) as *const f32 as *const c_void,
            g.a.ptr as *const c_void,
            ty,
            int(g.a.ld as u64, "lda")?,
            g.a.batch_stride,
            g.b.ptr as *const c_void,
            ty,
            int(g.b.ld as u64, "ldb")?,
            g.b.batch_stride,
            (&beta) as *const f32 as *const c_void,
            g.d_ptr as *mut c_void,
            ty,
            int(g.ldd as u64, "ldd")?,
            g.d_batch_stride,
            g.batch,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(blas_err("cublasGemmStridedBatchedEx"))
    }
}
