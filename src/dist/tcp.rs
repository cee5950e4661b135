//! A group of processes joined over TCP through rank 0 (a star: every rank sends its values to
//! rank 0, which adds them in rank order and sends the sum back). It needs nothing but the
//! network, so CPU processes (and the tests) train data parallel with it; GPUs sum through
//! NCCL, which it introduces (rank 0's NCCL id travels over it).
//!
//! Frames are a little-endian u64 header and a payload: values as f32 (header: their count),
//! or an error message (header: `ERROR | length`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::dist::{first_host, timeout, Collective, DistError, World};

const ERROR: u64 = 1 << 63;
/// The first frame from a connecting rank: this magic and its rank.
const HELLO: u64 = 0x7275_6e6e_6572_0000;

/// One member of a TCP group (see the module doc).
pub struct TcpGroup {
    world: World,
    /// Rank 0: a stream to every other rank, by rank (index 0 unused). Others: the one to rank 0.
    links: Mutex<Vec<Option<TcpStream>>>,
}

/// Where rank 0 listens: `MASTER_ADDR` (else the first host of `SLURM_JOB_NODELIST`, else
/// 127.0.0.1) and `MASTER_PORT` (else 29500), as torchrun and Slurm scripts name them.
pub fn rendezvous_from_env() -> Result<(String, u16), DistError> {
    let host = std::env::var("MASTER_ADDR")
        .ok()
        .or_else(|| {
            std::env::var("SLURM_JOB_NODELIST")
                .ok()
                .and_then(|l| first_host(&l))
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = match std::env::var("MASTER_PORT") {
        Ok(v) => v.trim().parse::<u16>().map_err(|_| DistError::Env {
            var: "MASTER_PORT",
            value: v,
            expected: "a TCP port (1-65535)".into(),
        })?,
        Err(_) => 29500,
    };
    Ok((host, port))
}

fn io_error(world: World, what: &str, e: std::io::Error) -> DistError {
    DistError::Failed {
        rank: world.rank,
        message: format!("{what}: {e}"),
    }
}

fn write_frame(stream: &mut TcpStream, header: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&header.to_le_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

fn read_u64(stream: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_bytes(stream: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    stream.read_exact(&mut b)?;
    Ok(b)
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

impl TcpGroup {
    /// Joins the group: rank 0 listens on `host:port` (every interface when `host` is not
    /// local) and waits for the others; the others connect, retrying until the wait runs out.
    pub fn join(world: World, host: &str, port: u16) -> Result<TcpGroup, DistError> {
        let limit = timeout();
        let started = Instant::now();
        let mut links: Vec<Option<TcpStream>> = (0..world.size).map(|_| None).collect();
        if world.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port))
                .map_err(|e| io_error(world, &format!("listening on port {port}"), e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_error(world, "listening", e))?;
            let mut joined = 1;
            while joined < world.size {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(|e| io_error(world, "accepting", e))?;
                        stream.set_read_timeout(Some(limit)).ok();
                        let (magic, rank) = (read_u64(&mut stream), read_u64(&mut stream));
                        let rank = match (magic, rank) {
                            (Ok(HELLO), Ok(r)) if (1..world.size as u64).contains(&r) => r as usize,
                            // Not one of ours (a port scan, a stale rank of another run).
                            _ => continue,
                        };
                        if links[rank].replace(stream).is_none() {
                            joined += 1;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if started.elapsed() > limit {
                            return Err(DistError::Timeout {
                                rank: 0,
                                world: world.size,
                                waited_s: limit.as_secs(),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_error(world, "accepting a rank", e)),
                }
            }
        } else {
            let stream = loop {
                let attempt = (host, port)
                    .to_socket_addrs()
                    .and_then(|mut addrs| {
                        addrs.next().ok_or_else(|| {
                            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                        })
                    })
                    .and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(5)));
                match attempt {
                    Ok(s) => break s,
                    Err(_) if started.elapsed() < limit => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => {
                        return Err(io_error(
                            world,
                            &format!("reaching rank 0 at {host}:{port}"),
                            e,
                        ))
                    }
                }
            };
            let mut stream = stream;
            stream.set_read_timeout(Some(limit)).ok();
            write_frame(&mut stream, HELLO, &(world.rank as u64).to_le_bytes())
                .map_err(|e| io_error(world, "greeting rank 0", e))?;
            links[0] = Some(stream);
        }
        for s in links.iter().flatten() {
            s.set_nodelay(true).ok();
        }
        Ok(TcpGroup {
            world,
            links: Mutex::new(links),
        })
    }

    /// Rank 0's `bytes` on every rank (an NCCL unique id); other ranks' `bytes` are replaced.
    pub fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<(), DistError> {
        let world = self.world;
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if world.rank == 0 {
            for s in links.iter_mut().flatten() {
                write_frame(s, bytes.len() as u64, bytes)
                    .map_err(|e| io_error(world, "broadcasting", e))?;
            }
        } else {
            let s = links[0].as_mut().expect("a link to rank 0");
            let n = read_u64(s).map_err(|e| io_error(world, "receiving a broadcast", e))?;
            *bytes = read_bytes(s, n as usize).map_err(|e| io_error(world, "receiving", e))?;
        }
        Ok(())
    }
}

impl Collective for TcpGroup {
    fn world(&self) -> World {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), DistError> {
        let world = self.world;
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let lost = |e| io_error(world, "a rank's connection", e);
        if world.rank != 0 {
            let s = links[0].as_mut().expect("a link to rank 0");
            write_frame(s, values.len() as u64, &to_bytes(values)).map_err(lost)?;
            let header = read_u64(s).map_err(lost)?;
            if header & ERROR != 0 {
                let message = read_bytes(s, (header & !ERROR) as usize).map_err(lost)?;
                return Err(DistError::Failed {
                    rank: world.rank,
                    message: String::from_utf8_lossy(&message).into_owned(),
                });
            }
            let sum = read_bytes(s, header as usize * 4).map_err(lost)?;
            from_bytes(&sum, values);
            return Ok(());
        }
        // Rank 0: every rank's values, then the sum in rank order (or why there is none).
        let mut lengths = vec![values.len()];
        let mut parts = Vec::with_capacity(world.size - 1);
        for s in links.iter_mut().flatten() {
            let n = read_u64(s).map_err(lost)? as usize;
            lengths.push(n);
            parts.push(read_bytes(s, n * 4).map_err(lost)?);
        }
        let failure = lengths
            .iter()
            .any(|&n| n != values.len())
            .then(|| format!("the ranks summed buffers of different lengths {lengths:?}"));
        if let Some(message) = &failure {
            for s in links.iter_mut().flatten() {
                write_frame(s, ERROR | message.len() as u64, message.as_bytes()).map_err(lost)?;
            }
            return Err(DistError::Failed {
                rank: 0,
                message: message.clone(),
            });
        }
        let mut part = vec![0f32; values.len()];
        for bytes in &parts {
            from_bytes(bytes, &mut part);
            for (v, p) in values.iter_mut().zip(&part) {
                *v += p;
            }
        }
        let sum = to_bytes(values);
        for s in links.iter_mut().flatten() {
            write_frame(s, values.len() as u64, &sum).map_err(lost)?;
        }
        Ok(())
    }
}
