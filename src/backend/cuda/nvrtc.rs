//! Runtime compilation of runner's CUDA sources (NVRTC, loaded by cudarc at run time, so the
//! build needs no CUDA toolkit): the device's compute capability, a source compiled for it into
//! a loaded module, and a kernel from the module.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{result as drv, sys as drv_sys};

use crate::backend::Error;

fn drv_err(call: &'static str) -> impl Fn(drv::DriverError) -> Error {
    move |e| Error::Cuda {
        call,
        detail: format!("{e:?}"),
    }
}

/// `(major, minor)` of device `ordinal`.
pub fn compute_capability(ordinal: usize) -> Result<(i32, i32), Error> {
    use drv_sys::CUdevice_attribute::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
    };
    // SAFETY: plain attribute queries on a valid device ordinal.
    unsafe {
        let dev = drv::device::get(ordinal as i32).map_err(drv_err("cuDeviceGet"))?;
        Ok((
            drv::device::get_attribute(dev, MAJOR).map_err(drv_err("cuDeviceGetAttribute"))?,
            drv::device::get_attribute(dev, MINOR).map_err(drv_err("cuDeviceGetAttribute"))?,
        ))
    }
}

/// Compiles `source` (`name` in messages) for device `ordinal` with the extra NVRTC `flags` and
/// loads it into the current context (callers run this under `cublas::with_state`, which makes
/// the device's primary context current). The module stays loaded for the life of the process.
pub fn load_module(
    ordinal: usize,
    source: &str,
    name: &'static str,
    flags: Vec<String>,
) -> Result<drv_sys::CUmodule, Error> {
    let (major, minor) = compute_capability(ordinal)?;
    let mut options = vec![
        format!("--gpu-architecture=compute_{major}{minor}"),
        "-std=c++17".into(),
    ];
    options.extend(flags);
    let options = cudarc::nvrtc::CompileOptions {
        options,
        name: Some(name.into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| Error::Cuda {
        call: "nvrtcCompileProgram",
        detail: format!("{name}: {e:?}"),
    })?;
    let image = CString::new(ptx.to_src()).map_err(|_| Error::Cuda {
        call: "nvrtcGetPTX",
        detail: format!("{name}: PTX with an interior NUL"),
    })?;
    // SAFETY: `image` is a NUL-terminated PTX module for the bound context's device.
    unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
        .map_err(drv_err("cuModuleLoadData"))
}

/// The kernel `name` of `module`, allowed `dynamic_smem` bytes of dynamic shared memory.
pub fn function(
    module: drv_sys::CUmodule,
    name: &str,
    dynamic_smem: usize,
) -> Result<drv_sys::CUfunction, Error> {
    let cname = CString::new(name).expect("kernel names have no NUL");
    // SAFETY: the module stays loaded for the life of the process.
    let f = unsafe { drv::module::get_function(module, cname) }
        .map_err(drv_err("cuModuleGetFunction"))?;
    if dynamic_smem > 0 {
        // SAFETY: raising the dynamic shared memory limit of a valid function.
        unsafe {
            drv::function::set_function_attribute(
                f,
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_smem as i32,
            )
        }
        .map_err(drv_err("cuFuncSetAttribute"))?;
    }
    Ok(f)
}

/// Kernel handles (plain driver handles, valid in every thread of the process).
#[derive(Clone)]
pub struct Functions(pub Vec<drv_sys::CUfunction>);

// SAFETY: CUfunction handles are plain driver handles, valid in every thread of the process.
unsafe impl Send for Functions {}

type LoadedSets = HashMap<(&'static str, usize), Result<Functions, String>>;

static LOADED: OnceLock<Mutex<LoadedSets>> = OnceLock::new();

/// The kernels `names` of `source` (`name` in messages; compiled with `flags`) on device
/// `ordinal`, in order: compiled and loaded on the first call, the result (or the failure)
/// kept for the life of the process.
pub fn kernels(
    ordinal: usize,
    source: &'static str,
    name: &'static str,
    flags: &[String],
    names: &[&str],
) -> Result<Functions, Error> {
    let all = LOADED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = all.lock().map_err(|_| Error::Poisoned)?;
    let entry = guard.entry((name, ordinal)).or_insert_with(|| {
        crate::backend::cuda::cublas::with_state(ordinal, |_| {
            let module = load_module(ordinal, source, name, flags.to_vec())?;
            let functions = names
                .iter()
                .map(|n| function(module, n, 0))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Functions(functions))
        })
        .map_err(|e| e.to_string())
    });
    match entry {
        Ok(f) => Ok(f.clone()),
        Err(e) => Err(Error::Cuda {
            call: "NVRTC kernels",
            detail: format!("{name}: {e}"),
        }),
    }
}

/// Launch arguments: scalars and pointers take 8 bytes each, a by-value struct its own size
/// (see [`Args::bytes`]); `pointers` is taken once all are pushed, and the driver reads each
/// parameter's own size from its slot.
#[derive(Default)]
pub struct Args(Vec<Vec<u64>>);

impl Args {
    pub fn ptr(&mut self, p: u64) -> &mut Self {
        self.0.push(vec![p]);
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.push(vec![v as u64]);
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.push(vec![u64::from(v as u32)]);
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.0.push(vec![u64::from(v.to_bits())]);
        self
    }
    /// A struct passed by value, as its bytes in the device's layout (little-endian, C
    /// alignment); kept 8-byte aligned here.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let mut words = vec![0u64; b.len().div_ceil(8)];
        for (w, chunk) in words.iter_mut().zip(b.chunks(8)) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(word);
        }
        self.0.push(words);
        self
    }
    pub fn pointers(&mut self) -> Vec<*mut c_void> {
        self.0
            .iter_mut()
            .map(|slot| slot.as_mut_ptr() as *mut c_void)
            .collect()
    }
}

/// A kernel handle on its way to the server thread.
struct SendFunction(drv_sys::CUfunction);

// SAFETY: CUfunction handles are plain driver handles, valid in every thread of the process.
unsafe impl Send for SendFunction {}

/// Queues `function` on cubecl's server thread (see `queue`) over the memory of `handles`, the
/// last an output: `args` builds the argument list from their device pointers, in order;
/// `shape` is (grid, threads a block, dynamic shared memory bytes).
pub fn launch(
    ordinal: usize,
    client: &cubecl::client::ComputeClient<cubecl::cuda::CudaRuntime>,
    handles: Vec<cubecl::server::Handle>,
    what: &'static str,
    function: drv_sys::CUfunction,
    shape: ((u32, u32, u32), u32, usize),
    args: impl FnOnce(&[u64]) -> Args + Send + 'static,
) {
    let function = SendFunction(function);
    let (grid, threads, smem) = shape;
    crate::backend::cuda::queue::submit(client, handles, what, move |r| {
        let function = function;
        let mut args = args(r.ptrs);
        let mut params = args.pointers();
        // The device state makes the primary context current on the server thread, as the
        // launch needs.
        crate::backend::cuda::cublas::with_state(ordinal, |_| {
            // SAFETY: `args` matches the kernel's signature (the callers' contract, see the .cu
            // files); the pointers are live cubecl allocations, ordered on `r.stream` (see
            // `queue`); the function's module lives as long as the process.
            unsafe {
                drv::launch_kernel(
                    function.0,
                    grid,
                    (threads, 1, 1),
                    smem as u32,
                    r.stream,
                    &mut params,
                )
            }
            .map_err(|e| Error::Cuda {
                call: "cuLaunchKernel",
                detail: format!("{what}: {e:?}"),
            })
        })
    });
}
