//! Backend selection: one generic code path, dispatched to ndarray (CPU) or burn-cuda.
//!
//! Rust closures cannot be generic over a type, so work to run on a device is a
//! [`BackendTask`] with a generic `run::<B>` method; [`run_on_device`] picks `B`.
//! CUDA is compiled only with the crate's `cuda` feature.

use std::str::FromStr;

use burn::tensor::backend::Backend;

/// Where to run: `cpu`, `cuda`, `cuda:N` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    /// CUDA device 0 when built with the `cuda` feature, else the CPU.
    #[default]
    Auto,
}

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid device {value:?}; expected cpu, cuda, cuda:N or auto")]
    Parse { value: String },
    #[error("device {value} needs a build with the `cuda` feature")]
    CudaNotBuilt { value: String },
    #[error(
        "bf16 training needs a CUDA device; device {value} runs on the CPU (ndarray has no bf16)"
    )]
    Bf16NeedsCuda { value: String },
    #[error(transparent)]
    OutOfMemory(#[from] crate::backend::memory::OutOfMemory),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceError::Parse {
            value: s.to_string(),
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

/// Work generic over the backend.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// The CPU backend used in tests and `--device cpu`.
pub type CpuBackend = burn::backend::NdArray<f32>;

/// Whether an NVIDIA driver is loaded, so `auto` can pick CUDA without failing on CPU machines.
pub fn cuda_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidiactl").exists()
}

/// Runs `task` on the chosen backend.
pub fn run_on_device<T: BackendTask>(
    choice: DeviceChoice,
    task: T,
) -> Result<T::Output, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(task.run::<CpuBackend>(Default::default())),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(index) => {
            Ok(task.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(index)))
        }
        #[cfg(feature = "cuda")]
        DeviceChoice::Auto if cuda_driver_present() => {
            Ok(task.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(0)))
        }
        #[cfg(feature = "cuda")]
        DeviceChoice::Auto => Ok(task.run::<CpuBackend>(Default::default())),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => Err(DeviceError::CudaNotBuilt {
            value: choice.to_string(),
        }),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Auto => Ok(task.run::<CpuBackend>(Default::default())),
    }
}

/// Whether `choice` resolves to the CPU (ndarray).
pub fn resolves_to_cpu(choice: DeviceChoice) -> bool {
    match choice {
        DeviceChoice::Cpu => true,
        DeviceChoice::Cuda(_) => false,
        DeviceChoice::Auto => !cfg!(feature = "cuda") || !cuda_driver_present(),
    }
}

/// Runs `task` with bf16 as the backend's float type (mixed-precision training: weights and
/// activations in bf16, the optimizer's f32 masters in [`crate::train::optim::AdamW`]).
/// Only CUDA has it; the caller checks [`resolves_to_cpu`] first.
pub fn run_on_device_bf16<T: BackendTask>(
    choice: DeviceChoice,
    task: T,
) -> Result<T::Output, DeviceError> {
    #[cfg(feature = "cuda")]
    if !resolves_to_cpu(choice) {
        let index = match choice {
            DeviceChoice::Cuda(i) => i,
            _ => 0,
        };
        return Ok(task.run::<burn::backend::Cuda<half::bf16, i32>>(
            burn::backend::cuda::CudaDevice::new(index),
        ));
    }
    let _ = task;
    Err(DeviceError::Bf16NeedsCuda {
        value: choice.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::ElementConversion;

    #[test]
    fn parses_device_strings() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "CUDA".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        let e = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(e.contains("\"tpu\""), "{e}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    struct Sum;
    impl BackendTask for Sum {
        type Output = f32;
        fn run<B: Backend>(self, device: B::Device) -> f32 {
            let t = burn::tensor::Tensor::<B, 1>::from_floats([1.0, 2.0, 3.5], &device);
            t.sum().into_scalar().elem::<f32>()
        }
    }

    #[test]
    fn dispatches_to_cpu() {
        assert_eq!(run_on_device(DeviceChoice::Cpu, Sum).unwrap(), 6.5);
    }
}
