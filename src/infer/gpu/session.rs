//! One batch of sequences on the GPU engine: a preallocated cache slab (`[rows, capacity]` slots
//! per layer, written in place), scratch buffers sized for the largest pass, and one captured
//! CUDA graph per decode batch size, replayed for every later step of that size so a token step
//! costs one launch instead of a dozen per layer.

use std::collections::HashMap;

use cudarc::driver::sys;

use super::device::{self, opt_ptr, DevBuf, Graph, ATTEND_THREADS};
use super::weights::GpuModel;
use crate::backend::cuda::cublas::{self, BlasState};
use crate::backend::cuda::nvrtc::Args;
use crate::backend::Error;
use crate::infer::model::TokenIn;

/// Tokens a prefill pass takes at most (bounds the scratch buffers of long prompts).
pub(super) const PREFILL_TOKENS: usize = 2048;

/// The per-token inputs of a pass, as i32 arrays at fixed places (captured graphs read them).
struct TokenTable {
    buf: DevBuf,
    /// Capacity in tokens.
    cap: usize,
    /// Capacity of the wanted-row index.
    want_cap: usize,
}

impl TokenTable {
    fn ids(&self) -> u64 {
        self.buf.ptr
    }
    fn pos(&self) -> u64 {
        self.buf.at(self.cap, 4)
    }
    fn row(&self) -> u64 {
        self.buf.at(2 * self.cap, 4)
    }
    fn slot(&self) -> u64 {
        self.buf.at(3 * self.cap, 4)
    }
    fn want(&self) -> u64 {
        self.buf.at(4 * self.cap, 4)
    }
    /// Sampling keys (u64, one per wanted row), 8-byte aligned after the i32 arrays.
    fn keys(&self) -> u64 {
        self.buf
            .at((4 * self.cap + self.want_cap).next_multiple_of(2), 4)
    }
    /// Picked tokens (i32, one per wanted row).
    fn picked(&self) -> u64 {
        self.keys() + 8 * self.want_cap as u64
    }
}

struct Scratch {
    /// Residual stream `[M, H]` f32.
    h: DevBuf,
    xn: DevBuf,
    qkv: DevBuf,
    q: DevBuf,
    attn: DevBuf,
    delta: DevBuf,
    gate_up: DevBuf,
    act: DevBuf,
    /// Final-normed wanted rows `[rows, H]`.
    last: DevBuf,
    /// `[rows, vocab]` of the model's element type.
    logits: DevBuf,
}

/// Logits of a pass, left in the session's buffer until the next pass.
#[derive(Clone, Copy, Debug)]
pub(super) struct PassLogits {
    pub ptr: u64,
    pub rows: usize,
}

/// A batch of sequences on the engine.
pub struct GpuSession<'m> {
    pub(super) model: &'m GpuModel,
    stream: sys::CUstream,
    rows: usize,
    capacity: usize,
    k_cache: DevBuf,
    v_cache: DevBuf,
    lens: Vec<usize>,
    table: TokenTable,
    scratch: Scratch,
    graphs: HashMap<usize, Graph>,
    use_graphs: bool,
    /// Host staging for the token table.
    staged: Vec<i32>,
}

fn alloc(ordinal: usize, elems: usize, elem_bytes: usize) -> Result<DevBuf, Error> {
    DevBuf::new(ordinal, elems * elem_bytes)
}

impl<'m> GpuSession<'m> {
    /// A cache for `rows` sequences of at most `capacity` tokens each.
    pub fn new(model: &'m GpuModel, rows: usize, capacity: usize) -> Result<Self, Error> {
        let (o, d, e) = (model.ordinal, model.dims, model.elem.size());
        let slots = model.dims.layers * rows * capacity * d.kv_heads * d.head_dim;
        let m = rows.max(PREFILL_TOKENS.min(rows * capacity)).max(1);
        let table_words = 4 * m + rows + 1 + 2 * rows + rows + 2;
        let scratch = Scratch {
            h: alloc(o, m * d.hidden, 4)?,
            xn: alloc(o, m * d.hidden, e)?,
            qkv: alloc(o, m * d.qkv_width(), e)?,
            q: alloc(o, m * d.heads * d.head_dim, e)?,
            attn: alloc(o, m * d.heads * d.head_dim, e)?,
            delta: alloc(o, m * d.hidden, e)?,
            gate_up: alloc(o, m * 2 * d.inter, e)?,
            act: alloc(o, m * d.inter, e)?,
            last: alloc(o, rows * d.hidden, e)?,
            logits: alloc(o, rows * d.vocab, e)?,
        };
        Ok(Self {
            model,
            stream: device::engine_stream(o)?,
            rows,
            capacity,
            k_cache: alloc(o, slots, e)?,
            v_cache: alloc(o, slots, e)?,
            lens: vec![0; rows],
            table: TokenTable {
                buf: alloc(o, table_words, 4)?,
                cap: m,
                want_cap: rows,
            },
            scratch,
            graphs: HashMap::new(),
            use_graphs: std::env::var("RUNNER_DECODE_GRAPHS").map_or(true, |v| v.trim() != "0"),
            staged: Vec::new(),
        })
    }

    /// Tokens one pass takes at most.
    pub fn max_pass_tokens(&self) -> usize {
        self.table.cap
    }

    /// Filled slots of row `row`.
    pub fn len(&self, row: usize) -> usize {
        self.lens[row]
    }

    /// Bytes of device memory the session holds (cache and scratch).
    pub fn bytes(&self) -> usize {
        let s = &self.scratch;
        self.k_cache.bytes
            + self.v_cache.bytes
            + self.table.buf.bytes
            + [
                &s.h, &s.xn, &s.qkv, &s.q, &s.attn, &s.delta, &s.gate_up, &s.act, &s.last,
                &s.logits,
            ]
            .iter()
            .map(|b| b.bytes)
            .sum::<usize>()
    }

    /// Runs `tokens` (at most [`Self::max_pass_tokens`]; each names its row, slot and position,
    /// slots written in place) and returns the logits of the tokens at `want` (indices into
    /// `tokens`), or of every token when `want` is `None` (a decode step: one token per row).
    pub(super) fn forward(
        &mut self,
        tokens: &[TokenIn],
        want: Option<&[usize]>,
    ) -> Result<PassLogits, Error> {
        let n = tokens.len();
        assert!(n > 0 && n <= self.table.cap, "pass of {n} tokens");
        for t in tokens {
            assert!(
                t.row < self.rows && t.slot < self.capacity,
                "slot outside the cache"
            );
            self.lens[t.row] = self.lens[t.row].max(t.slot + 1);
        }
        let wanted = want.map_or(n, <[usize]>::len);
        assert!(
            wanted <= self.table.want_cap,
            "more wanted rows than the logits hold"
        );
        // The token table, staged compactly (ids, pos, row, slot: n each, then the wanted
        // indices) and uploaded to its fixed places.
        let cap = self.table.cap;
        self.staged.clear();
        self.staged.extend(tokens.iter().map(|t| t.id as i32));
        self.staged.extend(tokens.iter().map(|t| t.pos as i32));
        self.staged.extend(tokens.iter().map(|t| t.row as i32));
        self.staged.extend(tokens.iter().map(|t| t.slot as i32));
        self.staged
            .extend(want.unwrap_or(&[]).iter().map(|&i| i as i32));
        let ordinal = self.model.ordinal;
        let stream = self.stream;
        let graph_step = want.is_none() && self.use_graphs;
        cublas::with_state(ordinal, |blas| {
            for k in 0..4 {
                // SAFETY: each region holds `cap` i32 values; `n <= cap`.
                unsafe {
                    device::upload(
                        self.table.buf.at(k * cap, 4),
                        &self.staged[k * n..(k + 1) * n],
                        stream,
                    )?
                };
            }
            if want.is_some() {
                // SAFETY: the wanted index holds `want_cap >= wanted` values.
                unsafe {
                    device::upload(
                        self.table.want(),
                        &self.staged[4 * n..4 * n + wanted],
                        stream,
                    )?
                };
            }
            if graph_step {
                if !self.graphs.contains_key(&n) {
                    let body = |blas: &mut BlasState| self.queue_pass(blas, n, None);
                    match Graph::capture(ordinal, blas, stream, body) {
                        Ok(g) => {
                            self.graphs.insert(n, g);
                        }
                        Err(e) => {
                            tracing::warn!(
                                "decode steps run without CUDA graphs: capture failed: {e}"
                            );
                            self.use_graphs = false;
                            return self.queue_pass(blas, n, None);
                        }
                    }
                }
                self.graphs[&n].launch(stream)
            } else {
                self.queue_pass(blas, n, want.map(|_| wanted))
            }
        })?;
        Ok(PassLogits {
            ptr: self.scratch.logits.ptr,
            rows: wanted,
        })
    }

    /// Queues a forward pass of the `n` tokens in the table on the session's stream; `wanted`
    /// rows of logits gathered by the wanted index (`None`: all `n`).
    fn queue_pass(
        &self,
        blas: &mut BlasState,
        n: usize,
        wanted: Option<usize>,
    ) -> Result<(), Error> {
        let m = self.model;
        let (d, k, e) = (m.dims, m.kernels, m.elem);
        let (h, hd) = (d.hidden, d.head_dim);
        let s = &self.scratch;
        let t = &self.table;
        let stream = self.stream;
        let blocks = |width: usize| width.div_ceil(256) as u32;
        let nu = n as u32;
        let layer_slots = self.rows * self.capacity * d.kv_heads * hd;
        // SAFETY (every launch and product below): the buffers were sized in `new` for
        // `table.cap >= n` tokens and `rows` wanted rows; the argument lists follow the kernels'
        // signatures in decode.cu.
        unsafe {
            device::launch(
                k.embed,
                (blocks(h), nu, 1),
                256,
                stream,
                Args::default()
                    .ptr(m.embed.ptr)
                    .ptr(t.ids())
                    .ptr(s.h.ptr)
                    .i32(h as i32),
                "embed",
            )?;
            for (li, l) in m.layers.iter().enumerate() {
                // The previous layer's MLP output joins the residual (none before layer 0).
                let delta = if li == 0 { 0 } else { s.delta.ptr };
                self.add_norm(delta, 0, l.attn_norm.ptr, n)?;
                device::linear(
                    blas,
                    stream,
                    e,
                    s.xn.ptr,
                    n,
                    l.qkv.ptr,
                    h,
                    d.qkv_width(),
                    s.qkv.ptr,
                )?;
                let (kc, vc) = (
                    self.k_cache.at(li * layer_slots, e.size()),
                    self.v_cache.at(li * layer_slots, e.size()),
                );
                device::launch(
                    k.qkv_post,
                    (nu, (d.heads + 2 * d.kv_heads) as u32, 1),
                    128,
                    stream,
                    Args::default()
                        .ptr(s.qkv.ptr)
                        .ptr(opt_ptr(l.qkv_bias.as_ref()))
                        .ptr(opt_ptr(l.q_norm.as_ref()))
                        .ptr(opt_ptr(l.k_norm.as_ref()))
                        .ptr(m.inv_freq.ptr)
                        .ptr(t.pos())
                        .ptr(t.row())
                        .ptr(t.slot())
                        .ptr(s.q.ptr)
                        .ptr(kc)
                        .ptr(vc)
                        .i32(d.heads as i32)
                        .i32(d.kv_heads as i32)
                        .i32(hd as i32)
                        .i32(self.capacity as i32)
                        .f32(d.eps),
                    "qkv_post",
                )?;
                device::launch(
                    k.attend,
                    (nu, d.heads as u32, 1),
                    ATTEND_THREADS,
                    stream,
                    Args::default()
                        .ptr(s.q.ptr)
                        .ptr(kc)
                        .ptr(vc)
                        .ptr(t.row())
                        .ptr(t.slot())
                        .ptr(s.attn.ptr)
                        .i32(d.heads as i32)
                        .i32(d.kv_heads as i32)
                        .i32(hd as i32)
                        .i32(self.capacity as i32)
                        .f32(l.scale)
                        .i32(l.window),
                    "attend",
                )?;
                device::linear(
                    blas,
                    stream,
                    e,
                    s.attn.ptr,
                    n,
                    l.o.ptr,
                    d.heads * hd,
                    h,
                    s.delta.ptr,
                )?;
                self.add_norm(s.delta.ptr, opt_ptr(l.o_bias.as_ref()), l.ffn_norm.ptr, n)?;
                device::linear(
                    blas,
                    stream,
                    e,
                    s.xn.ptr,
                    n,
                    l.gate_up.ptr,
                    h,
                    2 * d.inter,
                    s.gate_up.ptr,
                )?;
                device::launch(
                    k.silu_mul,
                    (blocks(d.inter), nu, 1),
                    256,
                    stream,
                    Args::default()
                        .ptr(s.gate_up.ptr)
                        .ptr(s.act.ptr)
                        .i32(d.inter as i32),
                    "silu_mul",
                )?;
                device::linear(
                    blas,
                    stream,
                    e,
                    s.act.ptr,
                    n,
                    l.down.ptr,
                    d.inter,
                    h,
                    s.delta.ptr,
                )?;
            }
            if wanted == Some(0) {
                // A prefill pass in which no prompt ends: only the cache was wanted.
                return Ok(());
            }
            let last_delta = if m.layers.is_empty() { 0 } else { s.delta.ptr };
            self.add_norm(last_delta, 0, m.norm.ptr, n)?;
            let (rows, x) = match wanted {
                None => (n, s.xn.ptr),
                Some(w) => {
                    device::launch(
                        k.gather_rows,
                        (w as u32, 1, 1),
                        256,
                        stream,
                        Args::default()
                            .ptr(s.xn.ptr)
                            .ptr(t.want())
                            .ptr(s.last.ptr)
                            .i32(h as i32),
                        "gather_rows",
                    )?;
                    (w, s.last.ptr)
                }
            };
            let head = m.head.as_ref().unwrap_or(&m.embed).ptr;
            device::linear(blas, stream, e, x, rows, head, h, d.vocab, s.logits.ptr)
        }
    }

    /// One decode step: token `ids[row]` at position `pos[row]` for every row, in the row's next
    /// slot.
    pub(super) fn step(&mut self, ids: &[u32], pos: &[i64]) -> Result<PassLogits, Error> {
        let tokens: Vec<TokenIn> = ids
            .iter()
            .zip(pos)
            .enumerate()
            .map(|(row, (&id, &pos))| TokenIn {
                id,
                row,
                slot: self.lens[row],
                pos,
            })
            .collect();
        self.forward(&tokens, None)
    }

    /// `h += delta (+ bias)` (when `delta` is not null), then `xn = norm(h) * w`.
    fn add_norm(&self, delta: u64, bias: u64, w: u64, n: usize) -> Result<(), Error> {
        let m = self.model;
        // SAFETY: `h`, `delta` and `xn` hold `n` rows of `hidden`; `w` and `bias` `hidden` values.
        unsafe {
            device::launch(
                m.kernels.add_norm,
                (n as u32, 1, 1),
                256,
                self.stream,
                Args::default()
                    .ptr(self.scratch.h.ptr)
                    .ptr(delta)
                    .ptr(bias)
                    .ptr(w)
                    .ptr(self.scratch.xn.ptr)
                    .i32(m.dims.hidden as i32)
                    .f32(m.dims.eps),
                "add_norm",
            )
        }
    }

    /// One token per row of `logits`: the argmax (`keys` None) or a draw from
    /// softmax(logits / temperature) keyed per row; waits for the result.
    pub(super) fn pick(
        &mut self,
        logits: PassLogits,
        keys: Option<&[u64]>,
        temperature: f32,
    ) -> Result<Vec<u32>, Error> {
        let m = self.model;
        let stream = self.stream;
        let rows = logits.rows;
        let mut out = vec![0i32; rows];
        let (keys_ptr, picked) = (self.table.keys(), self.table.picked());
        cublas::with_state(m.ordinal, |_| {
            // SAFETY: the key and pick areas hold `want_cap >= rows` values; the logits `rows`.
            unsafe {
                if let Some(keys) = keys {
                    device::upload(keys_ptr, keys, stream)?;
                }
                device::launch(
                    m.kernels.pick,
                    (rows as u32, 1, 1),
                    1024,
                    stream,
                    Args::default()
                        .ptr(logits.ptr)
                        .i32(m.dims.vocab as i32)
                        .ptr(if keys.is_some() { keys_ptr } else { 0 })
                        .f32(if temperature > 0.0 {
                            1.0 / temperature
                        } else {
                            1.0
                        })
                        .ptr(picked),
                    "pick",
                )?;
                device::download(&mut out, picked, stream)
            }
        })?;
        Ok(out.into_iter().map(|t| t as u32).collect())
    }

    /// The logits `[rows, vocab]` on the host, as f32.
    pub(super) fn download_logits(&mut self, logits: PassLogits) -> Result<Vec<f32>, Error> {
        let m = self.model;
        let count = logits.rows * m.dims.vocab;
        let stream = self.stream;
        cublas::with_state(m.ordinal, |_| match m.elem {
            super::device::Elem::F32 => {
                let mut out = vec![0f32; count];
                // SAFETY: the logits buffer holds `count` f32 values.
                unsafe { device::download(&mut out, logits.ptr, stream)? };
                Ok(out)
            }
            super::device::Elem::Bf16 => {
                let mut raw = vec![0u16; count];
                // SAFETY: the logits buffer holds `count` bf16 values.
                unsafe { device::download(&mut raw, logits.ptr, stream)? };
                Ok(raw
                    .into_iter()
                    .map(|b| f32::from_bits(u32::from(b) << 16))
                    .collect())
            }
        })
    }

    /// Gives row `to` a copy of row `from`'s cache (a group's shared prompt).
    pub fn copy_row(&mut self, from: usize, to: usize) -> Result<(), Error> {
        let m = self.model;
        let d = m.dims;
        let e = m.elem.size();
        let len = self.lens[from];
        let per_slot = d.kv_heads * d.head_dim;
        let layer_slots = self.rows * self.capacity * per_slot;
        let stream = self.stream;
        cublas::with_state(m.ordinal, |_| {
            for li in 0..d.layers {
                for cache in [&self.k_cache, &self.v_cache] {
                    let src = cache.at(li * layer_slots + from * self.capacity * per_slot, e);
                    let dst = cache.at(li * layer_slots + to * self.capacity * per_slot, e);
                    // SAFETY: both rows hold `capacity >= len` slots of this layer.
                    unsafe { device::copy(dst, src, len * per_slot * e, stream)? };
                }
            }
            Ok(())
        })?;
        self.lens[to] = len;
        Ok(())
    }

    /// Copies one row of logits (`from` of `src`) to row `to` of `dst`, both `[_, vocab]`.
    pub(super) fn copy_logits_row(
        &self,
        dst: u64,
        to: usize,
        src: u64,
        from: usize,
    ) -> Result<(), Error> {
        let m = self.model;
        let row = m.dims.vocab * m.elem.size();
        let stream = self.stream;
        cublas::with_state(m.ordinal, |_| {
            // SAFETY: both buffers hold rows `from` / `to` of `vocab` values.
            unsafe {
                device::copy(
                    dst + (to * row) as u64,
                    src + (from * row) as u64,
                    row,
                    stream,
                )
            }
        })
    }
}

impl Drop for GpuSession<'_> {
    fn drop(&mut self) {
        // Nothing queued may still use the buffers when they are freed.
        let _ = cublas::with_state(self.model.ordinal, |_| device::sync(self.stream));
        self.graphs.clear();
    }
}
