//! burn-cuda glue for the fast kernels: cuBLAS GEMMs and the flash-attention kernels
//! (`flash_attention.cu`, compiled by NVRTC) on cubecl tensor memory, for the
//! plain `CubeBackend<CudaRuntime, ..>` and for its `Fusion` wrapper (burn-cuda's default).
//!
//! Reference: `crate::backend` docs; burn `examples/custom-cubecl-kernel`.

mod cross_entropy;
mod cube;
pub mod cublas;
pub mod cudnn_attention;
pub mod flash;
mod fusion;
mod nf4;
mod norm;
pub(crate) mod nvrtc;
pub mod optim;
pub(crate) mod queue;
mod rope;

pub use cube::cublas_matmul;

/// Products of [`crate::backend::matmul`] / `linear` / `matmul_2d` smaller than this many
/// multiply-adds stay on burn's own matmul. By default every one goes to cuBLAS: burn's matmul compiles and autotunes kernels for each new shape (a second
/// or more each), which stalled sampling, where the KV cache changes the attention shapes at
/// every token, for minutes; and it was no faster on the small products of a LoRA step.
/// `RUNNER_MIN_CUBLAS_MACS` in the environment overrides it (for measuring).
pub const DEFAULT_MIN_CUBLAS_MACS: u64 = 1;

static MIN_CUBLAS_MACS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MIN_CUBLAS_MACS);

/// Changes the size from which products go to cuBLAS (checks and benchmarks use 0).
pub fn set_min_cublas_macs(macs: u64) {
    MIN_CUBLAS_MACS.store(macs, std::sync::atomic::Ordering::Relaxed);
}

/// Whether a `[batch, m, k] @ [batch, k, n]` product goes to cuBLAS.
pub fn worth_cublas(batch: usize, m: usize, k: usize, n: usize) -> bool {
    static FROM_ENV: std::sync::Once = std::sync::Once::new();
    FROM_ENV.call_once(|| {
        if let Some(macs) = std::env::var("RUNNER_MIN_CUBLAS_MACS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            set_min_cublas_macs(macs);
        }
    });
    let macs = (batch as u64) * (m as u64) * (k as u64) * (n as u64);
    macs >= MIN_CUBLAS_MACS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Bytes of device memory in use on the current context (total - free), as `cuMemGetInfo`
/// reports it: includes memory cached by cubecl's pools and the cuBLAS workspace.
pub fn device_memory_used(ordinal: usize) -> Result<usize, crate::backend::Error> {
    cublas::with_state(ordinal, |_| {
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(|e| crate::backend::Error::Cuda {
                call: "cuMemGetInfo",
                detail: format!("{e:?}"),
            })?;
        Ok(total - free)
    })
}

/// Free and total memory of device `ordinal`, in bytes (`cuMemGetInfo`).
pub fn device_memory_info(ordinal: usize) -> Result<(usize, usize), crate::backend::Error> {
    cublas::with_state(ordinal, |_| {
        cudarc::driver::result::mem_get_info().map_err(|e| crate::backend::Error::Cuda {
            call: "cuMemGetInfo",
            detail: format!("{e:?}"),
        })
    })
}

/// Starts (`true`) or stops CUDA's profiler on device 0: with `ncu --profile-from-start off`
/// only the kernels between the two are measured (see [`crate::backend::profiled_step`]).
pub fn set_profiler(on: bool) -> Result<(), crate::backend::Error> {
    cublas::with_state(0, |_| {
        // SAFETY: plain driver calls on the context `with_state` made current.
        let result = unsafe {
            if on {
                cudarc::driver::sys::cuProfilerStart()
            } else {
                cudarc::driver::sys::cuProfilerStop()
            }
        };
        result.result().map_err(|e| crate::backend::Error::Cuda {
            call: "cuProfilerStart/Stop",
            detail: format!("{e:?}"),
        })
    })
}
