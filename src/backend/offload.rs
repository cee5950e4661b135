//! Tensors parked in host memory while the training step does not need them (activation
//! checkpointing with `"offload"` keeps each layer's input there until the layer's backward).
//!
//! [`FastOps::fast_offload`](crate::backend::FastOps::fast_offload) starts the copy; on CUDA it is
//! queued on the tensor's stream and the host goes on at once, so the copy overlaps the next
//! layers' kernels and the device memory is released when the copy is done. [`Offloaded::restore`]
//! waits for the copy only if it has not finished, and uploads the values again.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use burn::tensor::{backend::Backend, ops::FloatTensor, TensorData};

/// A copy to host memory that is under way.
pub type HostRead = Pin<Box<dyn Future<Output = Result<TensorData, String>> + Send>>;

enum Parked<B: Backend> {
    Ready(TensorData),
    Pending(HostRead),
    /// Uploaded again ahead of its use ([`Offloaded::prefetch`]).
    OnDevice(FloatTensor<B>),
    Taken,
}

/// A tensor's values in host memory (or on their way there, or back).
pub struct Offloaded<B: Backend> {
    parked: Mutex<Parked<B>>,
    device: B::Device,
}

impl<B: Backend> std::fmt::Debug for Offloaded<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offloaded")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Offloaded<B> {
    /// Values already on the host.
    pub fn ready(data: TensorData, device: B::Device) -> Self {
        Self {
            parked: Mutex::new(Parked::Ready(data)),
            device,
        }
    }

    /// A copy that `read` completes.
    pub fn pending(read: HostRead, device: B::Device) -> Self {
        Self {
            parked: Mutex::new(Parked::Pending(read)),
            device,
        }
    }

    /// The same parked values, restored through another backend on the same device (the
    /// fusion backend over the backend that made the copy).
    pub fn for_backend<B2: Backend<Device = B::Device>>(self) -> Offloaded<B2> {
        let parked = match self
            .parked
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            Parked::Ready(data) => Parked::Ready(data),
            Parked::Pending(read) => Parked::Pending(read),
            Parked::OnDevice(_) | Parked::Taken => {
                unreachable!("a copy changes backend before it is restored")
            }
        };
        Offloaded {
            parked: Mutex::new(parked),
            device: self.device,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked<B>> {
        self.parked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the upload now (it is queued before whatever runs next), so that
    /// [`Self::restore`] finds the tensor on the device.
    pub fn prefetch(&self) {
        let mut parked = self.lock();
        let data = match std::mem::replace(&mut *parked, Parked::Taken) {
            Parked::Ready(data) => data,
            Parked::Pending(read) => block_on(read)
                .unwrap_or_else(|e| panic!("copying an offloaded tensor to the host failed: {e}")),
            other => {
                *parked = other;
                return;
            }
        };
        *parked = Parked::OnDevice(B::float_from_data(data, &self.device));
    }

    /// The tensor on its device again. Each parked tensor is restored once; a second call
    /// panics, as using a consumed value would.
    pub fn restore(&self) -> FloatTensor<B> {
        self.prefetch();
        match std::mem::replace(&mut *self.lock(), Parked::Taken) {
            Parked::OnDevice(x) => x,
            _ => panic!("an offloaded tensor is restored once"),
        }
    }
}

/// Something parked that can be brought back ahead of time (the next layer's input in a
/// backward pass).
pub trait Prefetch: Send + Sync {
    fn prefetch(&self);
}

impl<B: Backend> Prefetch for Offloaded<B> {
    fn prefetch(&self) {
        Offloaded::prefetch(self)
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread.
pub fn block_on<T>(future: impl Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(value) => return value,
            Poll::Pending => std::thread::park(),
        }
    }
}
