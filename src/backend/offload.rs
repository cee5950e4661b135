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

enum Parked {
    Ready(TensorData),
    Pending(HostRead),
}

/// A tensor's values in host memory (or on their way there).
pub struct Offloaded<B: Backend> {
    parked: Mutex<Option<Parked>>,
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
            parked: Mutex::new(Some(Parked::Ready(data))),
            device,
        }
    }

    /// A copy that `read` completes.
    pub fn pending(read: HostRead, device: B::Device) -> Self {
        Self {
            parked: Mutex::new(Some(Parked::Pending(read))),
            device,
        }
    }

    /// The same parked values, restored through another backend on the same device (a
    /// fusion backend over the backend that made the copy).
    pub fn for_backend<B2: Backend<Device = B::Device>>(self) -> Offloaded<B2> {
        Offloaded {
            parked: Mutex::new(
                self.parked
                    .into_inner()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            ),
            device: self.device,
        }
    }

    /// The tensor on its device again. Each parked tensor is restored once; a second call
    /// panics, as using a consumed value would.
    pub fn restore(&self) -> FloatTensor<B> {
        let parked = self
            .parked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .expect("an offloaded tensor is restored once");
        let data = match parked {
            Parked::Ready(data) => data,
            Parked::Pending(read) => block_on(read)
                .unwrap_or_else(|e| panic!("copying an offloaded tensor to the host failed: {e}")),
        };
        B::float_from_data(data, &self.device)
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
