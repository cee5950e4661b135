//! Foreign device work (cuBLAS GEMMs, the flash-attention kernels) queued on cubecl's server
//! thread, in order with burn's kernels, without the calling thread waiting.
//!
//! cubecl 0.10 runs every device call on one server thread per device. Its only public way to a
//! tensor's device pointer, `ComputeClient::get_resource`, makes the caller wait for that thread
//! to drain its queue and answer; at three to six pointers a GEMM or attention kernel, a LoRA
//! step spent most of its time asleep in those round trips. Here the pointer lookup and the
//! launch travel together as one message (`submit_with_server`, runner's patch of
//! cubecl-runtime, see vendor/cubecl-runtime/RUNNER_PATCH.md).
//!
//! The launch then runs after the call has returned, so a failure cannot fall back to burn's
//! ops: callers check on the calling thread first that the library or kernels load, and a
//! failure that still happens is kept and raised by the next call (as CUDA's own errors are).

use std::sync::Mutex;

use cubecl::cuda::CudaRuntime;
use cubecl::server::{ComputeServer, Handle};
use cudarc::driver::sys as drv_sys;

use crate::backend::Error;

static FAILED: Mutex<Option<String>> = Mutex::new(None);

/// Panics with the first queued launch that failed, if one did: its output was never written,
/// so nothing computed since can be trusted.
pub fn raise_queued_failure() {
    let failed = FAILED.lock().map(|f| f.clone()).unwrap_or(None);
    if let Some(message) = failed {
        panic!("a GPU operation queued earlier failed: {message}");
    }
}

/// The device pointers of the queued operation's tensors, in the order they were given, and
/// the stream to queue on: the last tensor's (an output, which `get_resource` made wait for the
/// streams that wrote the others).
pub struct Resolved<'a> {
    pub ptrs: &'a [u64],
    pub stream: drv_sys::CUstream,
}

/// Queues `launch` on the server thread of `client`'s device. It runs after everything queued
/// before it, with the pointers of `handles` (kept alive until it returns).
pub fn submit(
    client: &cubecl::client::ComputeClient<CudaRuntime>,
    handles: Vec<Handle>,
    what: &'static str,
    launch: impl FnOnce(Resolved<'_>) -> Result<(), Error> + Send + 'static,
) {
    raise_queued_failure();
    let bindings: Vec<_> = handles.into_iter().map(Handle::binding).collect();
    client.submit_with_server(move |server, stream_id| {
        let mut held = Vec::with_capacity(bindings.len());
        for binding in bindings {
            match server.get_resource(binding, stream_id) {
                Ok(r) => held.push(r),
                Err(e) => {
                    return record(Error::Cuda {
                        call: what,
                        detail: format!("cubecl get_resource: {e:?}"),
                    })
                }
            }
        }
        let ptrs: Vec<u64> = held.iter().map(|r| r.resource().ptr).collect();
        let Some(stream) = held.last().map(|r| r.resource().stream) else {
            return;
        };
        if let Err(e) = launch(Resolved {
            ptrs: &ptrs,
            stream,
        }) {
            record(e);
        }
        // The memory stays reserved until here; later reuse is ordered on the same stream.
        drop(held);
    });
}

fn record(err: Error) {
    eprintln!("runner backend: {err}");
    if let Ok(mut slot) = FAILED.lock() {
        slot.get_or_insert_with(|| err.to_string());
    }
}
