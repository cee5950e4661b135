//! Sums over NCCL (through cudarc), the GPUs' own collective library: the ranks' NCCL
//! communicator is made from rank 0's unique id, which the TCP group carries to the others.
//!
//! The values cross to the device and back: the gradients of runner's trainable parameters
//! reach the loop's sum as host buffers (see `bucket.rs`).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::dist::{Collective, DistError, TcpGroup, World};

/// One rank's NCCL communicator on its GPU (device 0 of the process, see `pin_gpu`).
pub struct NcclGroup {
    world: World,
    link: Mutex<Link>,
}

struct Link {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator is used by one thread at a time (the mutex), on its own stream; NCCL
// communicators may be used from any thread that does not use them concurrently.
unsafe impl Send for Link {}

fn failed(world: World, what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Failed {
        rank: world.rank,
        message: format!("NCCL: {what}: {e:?} (is libnccl.so.2 on the library path?)"),
    }
}

impl NcclGroup {
    /// Makes the communicator of `rendezvous`'s ranks: rank 0's new id, broadcast over TCP.
    pub fn join(rendezvous: &TcpGroup) -> Result<NcclGroup, DistError> {
        let world = rendezvous.world();
        let mut bytes = if world.rank == 0 {
            let id = Id::new().map_err(|e| failed(world, "making the unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        rendezvous.broadcast(&mut bytes)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(failed(world, "rank 0's unique id", bytes.len()));
        }
        for (i, b) in internal.iter_mut().zip(&bytes) {
            *i = *b as std::ffi::c_char;
        }
        let context = CudaContext::new(0).map_err(|e| failed(world, "opening the GPU", e))?;
        let stream = context
            .new_stream()
            .map_err(|e| failed(world, "a stream", e))?;
        let comm = Comm::from_rank(stream.clone(), world.rank, world.size, Id::uninit(internal))
            .map_err(|e| failed(world, "joining the communicator", e))?;
        Ok(NcclGroup {
            world,
            link: Mutex::new(Link { comm, stream }),
        })
    }
}

impl Collective for NcclGroup {
    fn world(&self) -> World {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), DistError> {
        let world = self.world;
        let link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        let mut buffer = link
            .stream
            .clone_htod(values)
            .map_err(|e| failed(world, "copying to the GPU", e))?;
        link.comm
            .all_reduce_in_place(&mut buffer, &ReduceOp::Sum)
            .map_err(|e| failed(world, "all-reduce", e))?;
        link.stream
            .memcpy_dtoh(&buffer, values)
            .map_err(|e| failed(world, "copying back", e))?;
        link.stream
            .synchronize()
            .map_err(|e| failed(world, "waiting for the sum", e))
    }
}
