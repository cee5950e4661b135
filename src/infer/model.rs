//! The decoder on quantized weights, for the dense families llama.cpp's GGUF files hold
//! (Llama/Mistral, Qwen2, Qwen3): RMSNorm, RoPE, grouped-query attention over an in-place KV
//! cache, SwiGLU, optional q/k/v biases, Qwen3's q/k norms, tied embeddings. Weights stay in
//! their GGUF encoding inside the file's memory map (or, from an HF folder, in f32), and every
//! projection is a [`quant::matmul_into`] over all the tokens of a step at once.
//!
//! A GGUF Llama stores q/k rows permuted (convert_hf_to_gguf.py `LlamaModel.permute`): each
//! head's rotary pairs are adjacent. Instead of undoing that, the rotation pairs adjacent
//! dimensions there (llama.cpp's "normal" rope mode); q·k is the same sum in either order.
//! Elsewhere the pairs are the two halves of a head, as `model/rope.rs` (HF `rotate_half`).
//! Reference: transformers `models/llama/modeling_llama.py`, `models/qwen3/modeling_qwen3.py`.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::gguf::reader::GgufFile;
use crate::infer::quant::{self, Activations, WeightType, WeightView};
use crate::infer::InferError;
use crate::model::config::{Activation, Architecture, ModelConfig};
use crate::model::hf::HostTensor;
use crate::model::rope::RotaryEmbedding;

/// Where a matrix's bytes live.
#[derive(Debug)]
enum Storage {
    /// `len` bytes at `start` of the GGUF's memory map.
    Mapped {
        start: usize,
        len: usize,
    },
    F32(Vec<f32>),
    /// Blocks quantized in memory ([`QuantModel::into_q8_0`]).
    Owned(Vec<u8>),
}

/// A `[rows, cols]` weight.
#[derive(Debug)]
pub struct Matrix {
    pub ty: WeightType,
    pub rows: usize,
    pub cols: usize,
    storage: Storage,
}

/// How rotary pairs are laid out in q and k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimension i pairs with i + head_dim / 2 (HF `rotate_half`).
    Halves,
    /// Dimension 2i pairs with 2i + 1 (a GGUF Llama's permuted rows).
    Adjacent,
}

/// One decoder layer's weights.
#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    o: Matrix,
    o_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    window: Option<usize>,
}

/// The decoder's weights and settings.
#[derive(Debug)]
pub struct QuantModel {
    pub config: ModelConfig,
    file: Option<GgufFile>,
    embed: Matrix,
    /// None: tied to the embeddings.
    output: Option<Matrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    pub rope_layout: RopeLayout,
    inv_freq: Vec<f32>,
    simd: bool,
    /// Runs the forward passes (None: rayon's global pool).
    pool: Option<rayon::ThreadPool>,
}

/// Why a config cannot run on this engine (the burn decoder serves it instead).
pub fn unsupported_reason(c: &ModelConfig) -> Option<String> {
    let v = &c.variant;
    if !matches!(
        c.architecture,
        Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3
    ) {
        return Some(format!("model_type `{}`", c.model_type));
    }
    if v.hidden_act != Activation::Silu {
        return Some("an activation other than SiLU".into());
    }
    if v.attn_logit_softcapping.is_some() || v.final_logit_softcapping.is_some() {
        return Some("logit soft-capping".into());
    }
    if v.rope_local_theta.is_some() || c.rotary_dim() != c.head_dim || c.rope_interleaved() {
        return Some("a partial or local rotary embedding".into());
    }
    if c.mlp_bias || c.embed_scale().is_some() || c.norm_offset() != 0.0 || c.output_norms() {
        return Some("MLP biases, scaled embeddings or extra norms".into());
    }
    if !c.head_dim.is_multiple_of(2)
        || c.num_key_value_heads == 0
        || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
    {
        return Some("an odd head size or uneven query groups".into());
    }
    None
}

impl QuantModel {
    /// Builds the model over a GGUF file's tensors, read in place.
    pub fn from_gguf(file: GgufFile, config: ModelConfig) -> Result<Self, InferError> {
        if let Some(reason) = unsupported_reason(&config) {
            return Err(InferError::Unsupported(reason));
        }
        let base = file.mapped().as_ptr() as usize;
        let mut mats: BTreeMap<String, Matrix> = BTreeMap::new();
        let mut vecs: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for t in &file.tensors {
            let bytes = file.tensor_bytes(t)?;
            if t.dims.len() == 1 {
                let v = crate::gguf::quants::dequantize(t.ty, bytes, t.n_elements() as usize)?;
                vecs.insert(t.name.clone(), v);
                continue;
            }
            let Some(ty) = WeightType::from_ggml(t.ty) else {
                return Err(InferError::Weight {
                    tensor: t.name.clone(),
                    what: format!("type {} has no kernel here", t.ty),
                });
            };
            let cols = t.dims[0] as usize;
            let rows = t.dims[1..].iter().product::<u64>() as usize;
            mats.insert(
                t.name.clone(),
                Matrix {
                    ty,
                    rows,
                    cols,
                    storage: Storage::Mapped {
                        start: bytes.as_ptr() as usize - base,
                        len: bytes.len(),
                    },
                },
            );
        }
        let layout = if config.architecture == Architecture::Llama {
            RopeLayout::Adjacent
        } else {
            RopeLayout::Halves
        };
        let names = |i: usize, s: &str| format!("blk.{i}.{s}");
        Self::assemble(config, Some(file), layout, mats, vecs, |n| match n {
            Name::Embed => "token_embd.weight".into(),
            Name::Output => "output.weight".into(),
            Name::Norm => "output_norm.weight".into(),
            Name::Layer(i, p) => names(
                i,
                match p {
                    "input_layernorm.weight" => "attn_norm.weight",
                    "self_attn.q_proj.weight" => "attn_q.weight",
                    "self_attn.k_proj.weight" => "attn_k.weight",
                    "self_attn.v_proj.weight" => "attn_v.weight",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "self_attn.q_proj.bias" => "attn_q.bias",
                    "self_attn.k_proj.bias" => "attn_k.bias",
                    "self_attn.v_proj.bias" => "attn_v.bias",
                    "self_attn.o_proj.bias" => "attn_output.bias",
                    "self_attn.q_norm.weight" => "attn_q_norm.weight",
                    "self_attn.k_norm.weight" => "attn_k_norm.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    "mlp.gate_proj.weight" => "ffn_gate.weight",
                    "mlp.up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    other => other,
                },
            ),
        })
    }

    /// Builds the model from HF-named f32 tensors (an HF folder), taking their data.
    pub fn from_hf_tensors(
        config: ModelConfig,
        tensors: BTreeMap<String, HostTensor>,
    ) -> Result<Self, InferError> {
        if let Some(reason) = unsupported_reason(&config) {
            return Err(InferError::Unsupported(reason));
        }
        let mut mats = BTreeMap::new();
        let mut vecs = BTreeMap::new();
        for (name, t) in tensors {
            match t.shape.len() {
                1 => {
                    vecs.insert(name, t.data);
                }
                2 => {
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    mats.insert(
                        name,
                        Matrix {
                            ty: WeightType::F32,
                            rows,
                            cols,
                            storage: Storage::F32(t.data),
                        },
                    );
                }
                _ => {}
            }
        }
        Self::assemble(config, None, RopeLayout::Halves, mats, vecs, |n| match n {
            Name::Embed => "model.embed_tokens.weight".into(),
            Name::Output => "lm_head.weight".into(),
            Name::Norm => "model.norm.weight".into(),
            Name::Layer(i, p) => format!("model.layers.{i}.{p}"),
        })
    }

    fn assemble(
        config: ModelConfig,
        file: Option<GgufFile>,
        rope_layout: RopeLayout,
        mut mats: BTreeMap<String, Matrix>,
        mut vecs: BTreeMap<String, Vec<f32>>,
        name: impl Fn(Name) -> String,
    ) -> Result<Self, InferError> {
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let mut mat = |n: String, rows: usize, cols: usize| -> Result<Matrix, InferError> {
            let m = mats.remove(&n).ok_or_else(|| InferError::Weight {
                tensor: n.clone(),
                what: "missing".into(),
            })?;
            if m.rows != rows || m.cols != cols {
                return Err(InferError::Weight {
                    tensor: n,
                    what: format!("shape [{}, {}], expected [{rows}, {cols}]", m.rows, m.cols),
                });
            }
            let (bs, _) = m.ty.block();
            if !cols.is_multiple_of(bs)
                || (m.ty.act_kind() == quant::ActKind::Q8 && !cols.is_multiple_of(32))
            {
                return Err(InferError::Weight {
                    tensor: n,
                    what: format!("{cols} columns do not fill {:?} blocks", m.ty),
                });
            }
            Ok(m)
        };
        let mut vec =
            |n: String, len: usize, required: bool| -> Result<Option<Vec<f32>>, InferError> {
                match vecs.remove(&n) {
                    Some(v) if v.len() == len => Ok(Some(v)),
                    Some(v) => Err(InferError::Weight {
                        tensor: n,
                        what: format!("{} values, expected {len}", v.len()),
                    }),
                    None if required => Err(InferError::Weight {
                        tensor: n,
                        what: "missing".into(),
                    }),
                    None => Ok(None),
                }
            };
        let embed = mat(name(Name::Embed), c.vocab_size, h)?;
        let output = if c.tie_word_embeddings {
            None
        } else {
            match mat(name(Name::Output), c.vocab_size, h) {
                Ok(m) => Some(m),
                Err(e) => return Err(e),
            }
        };
        let norm = vec(name(Name::Norm), h, true)?.unwrap_or_default();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let n = |p: &'static str| name(Name::Layer(i, p));
            let qkv_bias = c.qkv_bias();
            layers.push(Layer {
                attn_norm: vec(n("input_layernorm.weight"), h, true)?.unwrap_or_default(),
                q: mat(n("self_attn.q_proj.weight"), nq, h)?,
                k: mat(n("self_attn.k_proj.weight"), nkv, h)?,
                v: mat(n("self_attn.v_proj.weight"), nkv, h)?,
                q_bias: vec(n("self_attn.q_proj.bias"), nq, qkv_bias)?,
                k_bias: vec(n("self_attn.k_proj.bias"), nkv, qkv_bias)?,
                v_bias: vec(n("self_attn.v_proj.bias"), nkv, qkv_bias)?,
                o: mat(n("self_attn.o_proj.weight"), h, nq)?,
                o_bias: vec(n("self_attn.o_proj.bias"), h, c.o_bias())?,
                q_norm: vec(n("self_attn.q_norm.weight"), d, c.qk_norm())?,
                k_norm: vec(n("self_attn.k_norm.weight"), d, c.qk_norm())?,
                ffn_norm: vec(n("post_attention_layernorm.weight"), h, true)?.unwrap_or_default(),
                gate: mat(n("mlp.gate_proj.weight"), c.intermediate_size, h)?,
                up: mat(n("mlp.up_proj.weight"), c.intermediate_size, h)?,
                down: mat(n("mlp.down_proj.weight"), h, c.intermediate_size)?,
                window: c.layer_window(i),
            });
        }
        let inv_freq = RotaryEmbedding::new(&config).inv_freq;
        Ok(Self {
            config,
            file,
            embed,
            output,
            norm,
            layers,
            rope_layout,
            inv_freq,
            simd: quant::simd_available(),
            pool: None,
        })
    }

    /// Runs every forward pass on `pool` (a `--threads` count) instead of rayon's global pool.
    pub fn set_thread_pool(&mut self, pool: rayon::ThreadPool) {
        self.pool = Some(pool);
    }

    /// Threads the forward passes use.
    pub fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    /// Uses the scalar kernels even where SIMD ones would run (tests compare the two).
    pub fn set_simd(&mut self, on: bool) {
        self.simd = on && quant::simd_available();
    }

    fn view<'a>(&'a self, m: &'a Matrix) -> WeightView<'a> {
        let bytes: &[u8] = match &m.storage {
            Storage::F32(v) => bytemuck::cast_slice(v),
            Storage::Owned(v) => v,
            Storage::Mapped { start, len } => match &self.file {
                Some(f) => &f.mapped()[*start..*start + *len],
                None => &[],
            },
        };
        WeightView {
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
            bytes,
        }
    }

    /// The model with every f32 matrix whose rows are whole Q8_0 blocks quantized to Q8_0 (a
    /// quarter of the bytes each decoding step reads; about 3 significant digits, as a bf16
    /// copy would keep). Norms, biases and mapped GGUF blocks stay as they are.
    pub fn into_q8_0(mut self) -> Result<Self, InferError> {
        let quantize = |m: &mut Matrix| -> Result<(), InferError> {
            let Storage::F32(values) = &m.storage else {
                return Ok(());
            };
            if !m.cols.is_multiple_of(32) {
                return Ok(());
            }
            let bytes = crate::gguf::quants::quantize(crate::gguf::GgmlType::Q8_0, values)?;
            m.storage = Storage::Owned(bytes);
            m.ty = WeightType::Q8_0;
            Ok(())
        };
        quantize(&mut self.embed)?;
        if let Some(out) = self.output.as_mut() {
            quantize(out)?;
        }
        for l in &mut self.layers {
            for m in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                quantize(m)?;
            }
        }
        Ok(self)
    }

    /// Bytes of weights held outside the memory map (an HF folder's f32 tensors).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The kv width of one layer (kv heads × head_dim).
    pub fn kv_dim(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// Runs `tokens` through the model, writing their keys and values into `cache`, and
    /// returns in `logits` (`[want.len(), vocab]`) the logits of the tokens listed in `want`.
    ///
    /// # Shapes
    /// - tokens: one per processed position (any mix of rows); each attends to its row's cache
    ///   slots `0..=slot` (and the tokens before it in this call, written first).
    pub fn forward(
        &self,
        tokens: &[TokenIn],
        cache: &mut KvCache,
        scratch: &mut Scratch,
        want: &[usize],
        logits: &mut Vec<f32>,
    ) {
        match &self.pool {
            Some(pool) => pool.install(|| self.forward_here(tokens, cache, scratch, want, logits)),
            None => self.forward_here(tokens, cache, scratch, want, logits),
        }
    }

    fn forward_here(
        &self,
        tokens: &[TokenIn],
        cache: &mut KvCache,
        scratch: &mut Scratch,
        want: &[usize],
        logits: &mut Vec<f32>,
    ) {
        let c = &self.config;
        let t = tokens.len();
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (nq, nk) = (nh * d, nkv * d);
        let inter = c.intermediate_size;
        let eps = c.rms_norm_eps as f32;
        let simd = self.simd;
        let s = scratch;
        s.resize(t, h, nq, nk, inter);
        // Embeddings.
        let embed = self.view(&self.embed);
        for (tok, x) in tokens.iter().zip(s.x.chunks_exact_mut(h)) {
            quant::dequantize_row(&embed, tok.id as usize, x);
        }
        // Rotary tables per token.
        let half = d / 2;
        s.cos.resize(t * half, 0.0);
        s.sin.resize(t * half, 0.0);
        for (i, tok) in tokens.iter().enumerate() {
            for (j, f) in self.inv_freq.iter().enumerate() {
                let a = tok.pos as f32 * f;
                s.cos[i * half + j] = a.cos();
                s.sin[i * half + j] = a.sin();
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            rms_norm(&s.x, &layer.attn_norm, eps, h, &mut s.xn);
            let (q, k, v) = (
                self.view(&layer.q),
                self.view(&layer.k),
                self.view(&layer.v),
            );
            s.qkv.resize((nq + 2 * nk) * t, 0.0);
            self.project(&[q, k, v], &s.xn, t, &mut s.acts, &mut s.qkv);
            split_rows(
                &s.qkv,
                t,
                &mut [(&mut s.q, nq), (&mut s.k, nk), (&mut s.v, nk)],
            );
            add_bias(&mut s.q, layer.q_bias.as_deref());
            add_bias(&mut s.k, layer.k_bias.as_deref());
            add_bias(&mut s.v, layer.v_bias.as_deref());
            if let Some(w) = &layer.q_norm {
                rms_norm_in_place(&mut s.q, w, eps, d);
            }
            if let Some(w) = &layer.k_norm {
                rms_norm_in_place(&mut s.k, w, eps, d);
            }
            for i in 0..t {
                let (cs, sn) = (
                    &s.cos[i * half..(i + 1) * half],
                    &s.sin[i * half..(i + 1) * half],
                );
                rope(&mut s.q[i * nq..(i + 1) * nq], cs, sn, d, self.rope_layout);
                rope(&mut s.k[i * nk..(i + 1) * nk], cs, sn, d, self.rope_layout);
            }
            for (i, tok) in tokens.iter().enumerate() {
                cache.write(
                    li,
                    tok.row,
                    tok.slot,
                    &s.k[i * nk..(i + 1) * nk],
                    &s.v[i * nk..(i + 1) * nk],
                );
            }
            attention(
                tokens,
                &s.q,
                cache,
                li,
                AttnShape {
                    nh,
                    nkv,
                    d,
                    scale: c.attention_scale() as f32,
                    window: layer.window,
                },
                simd,
                &mut s.attn,
            );
            let o = self.view(&layer.o);
            s.proj.resize(h * t, 0.0);
            self.project(&[o], &s.attn, t, &mut s.acts, &mut s.proj);
            add_transposed(&mut s.x, &s.proj, t, h, layer.o_bias.as_deref());
            // MLP block.
            rms_norm(&s.x, &layer.ffn_norm, eps, h, &mut s.xn);
            let (g, u) = (self.view(&layer.gate), self.view(&layer.up));
            s.gu.resize(2 * inter * t, 0.0);
            self.project(&[g, u], &s.xn, t, &mut s.acts, &mut s.gu);
            // gu is [2 * inter, t]: gate rows then up rows.
            for i in 0..t {
                for r in 0..inter {
                    let gv = s.gu[r * t + i];
                    let uv = s.gu[(inter + r) * t + i];
                    s.act[i * inter + r] = gv / (1.0 + (-gv).exp()) * uv;
                }
            }
            let dn = self.view(&layer.down);
            self.project(&[dn], &s.act, t, &mut s.acts, &mut s.proj);
            add_transposed(&mut s.x, &s.proj, t, h, None);
        }
        // Final norm and head for the wanted tokens.
        let n = want.len();
        s.last.clear();
        for &i in want {
            s.last.extend_from_slice(&s.x[i * h..(i + 1) * h]);
        }
        s.xn.resize(n * h, 0.0);
        rms_norm(&s.last, &self.norm, eps, h, &mut s.xn[..n * h]);
        let head = self.view(self.output.as_ref().unwrap_or(&self.embed));
        let vocab = head.rows;
        s.head.resize(vocab * n, 0.0);
        let xn = std::mem::take(&mut s.xn);
        self.project(&[head], &xn[..n * h], n, &mut s.acts, &mut s.head);
        s.xn = xn;
        logits.resize(n * vocab, 0.0);
        if n == 1 {
            logits.copy_from_slice(&s.head);
        } else {
            for r in 0..vocab {
                for i in 0..n {
                    logits[i * vocab + r] = s.head[r * n + i];
                }
            }
        }
    }

    /// `out = [sum of rows, t]` for weights sharing one activation encoding.
    fn project(
        &self,
        ws: &[WeightView<'_>],
        x: &[f32],
        t: usize,
        acts: &mut Activations,
        out: &mut [f32],
    ) {
        let k = ws[0].cols;
        let kind = ws[0].ty.act_kind();
        if ws.iter().all(|w| w.ty.act_kind() == kind) {
            acts.encode(x, t, k, kind);
            quant::matmul_into(ws, acts, out, self.simd);
            return;
        }
        // Mixed encodings (e.g. a Q6_K v beside Q4_K q and k): one pass per weight.
        let mut at = 0;
        for w in ws {
            acts.encode(x, t, k, w.ty.act_kind());
            let len = w.rows * t;
            quant::matmul_into(
                std::slice::from_ref(w),
                acts,
                &mut out[at..at + len],
                self.simd,
            );
            at += len;
        }
    }
}

enum Name {
    Embed,
    Output,
    Norm,
    Layer(usize, &'static str),
}

/// One token to process: its id, the batch row it belongs to, the cache slot it fills and its
/// rotary position.
#[derive(Debug, Clone, Copy)]
pub struct TokenIn {
    pub id: u32,
    pub row: usize,
    pub slot: usize,
    pub pos: i64,
}

/// Keys and values of every layer for `rows` sequences of up to `capacity` slots, allocated
/// once: `[layer][row][kv_head][slot][head_dim]`, so the keys one query group attends to are one
/// contiguous stream (the hardware prefetcher keeps up with it; slot-major rows were read in
/// 256-byte pieces 768 bytes apart, and attention waited on memory). A row that shares its
/// first slots with another (a GRPO group's prompt) reads them from that row: the group's
/// attention then reads one copy of the prompt, which stays in the CPU's caches across the
/// group, instead of one copy per row from memory.
#[derive(Debug)]
pub struct KvCache {
    rows: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Per row: `(source row, slots)` when its first `slots` slots are the source row's.
    shared: Vec<Option<(usize, usize)>>,
}

/// The cached slots `first..=last` of a row, split where its shared prefix ends: `(row whose
/// memory holds them, first slot, slot count)` for each nonempty part.
fn cache_spans(
    shared: Option<(usize, usize)>,
    row: usize,
    first: usize,
    last: usize,
) -> [Option<(usize, usize, usize)>; 2] {
    match shared {
        Some((source, len)) if first < len => {
            let upto = len.min(last + 1);
            let own = (last + 1 > len).then(|| (row, len, last + 1 - len));
            [Some((source, first, upto - first)), own]
        }
        _ => [Some((row, first, last + 1 - first)), None],
    }
}

impl KvCache {
    pub fn new(model: &QuantModel, rows: usize, capacity: usize) -> Self {
        let (kv_heads, head_dim) = (model.config.num_key_value_heads, model.config.head_dim);
        let n = model.num_layers() * rows * capacity * kv_heads * head_dim;
        Self {
            rows,
            capacity,
            kv_heads,
            head_dim,
            k: vec![0.0; n],
            v: vec![0.0; n],
            shared: vec![None; rows],
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Where head `head`'s key (or value) of `slot` starts.
    fn at(&self, layer: usize, row: usize, head: usize, slot: usize) -> usize {
        (((layer * self.rows + row) * self.kv_heads + head) * self.capacity + slot) * self.head_dim
    }

    fn write(&mut self, layer: usize, row: usize, slot: usize, k: &[f32], v: &[f32]) {
        assert!(
            row < self.rows && slot < self.capacity,
            "KV cache slot out of range"
        );
        assert!(
            self.shared[row].is_none_or(|(_, len)| slot >= len),
            "KV cache: a shared slot is written"
        );
        let d = self.head_dim;
        for head in 0..self.kv_heads {
            let at = self.at(layer, row, head, slot);
            self.k[at..at + d].copy_from_slice(&k[head * d..(head + 1) * d]);
            self.v[at..at + d].copy_from_slice(&v[head * d..(head + 1) * d]);
        }
    }

    /// Gives row `to` the first `len` slots of row `from` (rows sharing a prompt): `to` reads
    /// them from `from` when `from` holds them itself, else gets a copy.
    pub fn copy_row(&mut self, from: usize, to: usize, len: usize, layers: usize) {
        if from == to {
            return;
        }
        // `from`'s own first slots, or those of the row it reads them from.
        let (source, linked) = match self.shared[from] {
            None => (from, len),
            Some((source, shared)) => (source, shared.min(len)),
        };
        self.shared[to] = Some((source, linked));
        for l in 0..layers {
            for head in 0..self.kv_heads {
                let (src, dst) = (self.at(l, from, head, linked), self.at(l, to, head, linked));
                let n = (len - linked) * self.head_dim;
                self.k.copy_within(src..src + n, dst);
                self.v.copy_within(src..src + n, dst);
            }
        }
    }
}

/// Buffers of one forward pass, grown to the largest step seen and then reused.
#[derive(Debug, Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    last: Vec<f32>,
    head: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    acts: Activations,
}

impl Scratch {
    fn resize(&mut self, t: usize, h: usize, nq: usize, nk: usize, inter: usize) {
        self.x.resize(t * h, 0.0);
        self.xn.resize(t * h, 0.0);
        self.q.resize(t * nq, 0.0);
        self.k.resize(t * nk, 0.0);
        self.v.resize(t * nk, 0.0);
        self.attn.resize(t * nq, 0.0);
        self.act.resize(t * inter, 0.0);
    }
}

/// `out[i] = x[i] / rms(x[i]) * w` for each row of width `n`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, n: usize, out: &mut [f32]) {
    for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = xs.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in os.iter_mut().zip(xs).zip(w) {
            *o = v * r * g;
        }
    }
}

/// [`rms_norm`] over `x` itself (Qwen3's per-head q/k norms).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32, n: usize) {
    for xs in x.chunks_exact_mut(n) {
        let ms = xs.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for (v, g) in xs.iter_mut().zip(w) {
            *v = *v * r * g;
        }
    }
}

/// Splits `[sum of widths, t]` rows into token-major `[t, width]` buffers.
fn split_rows(src: &[f32], t: usize, dst: &mut [(&mut Vec<f32>, usize)]) {
    let mut r0 = 0;
    for (buf, width) in dst.iter_mut() {
        let width = *width;
        for r in 0..width {
            let row = &src[(r0 + r) * t..(r0 + r + 1) * t];
            for (i, v) in row.iter().enumerate() {
                buf[i * width + r] = *v;
            }
        }
        r0 += width;
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
}

/// `x[i, r] += y[r, i] (+ bias[r])` for a `[h, t]` projection output.
fn add_transposed(x: &mut [f32], y: &[f32], t: usize, h: usize, bias: Option<&[f32]>) {
    for r in 0..h {
        let b = bias.map_or(0.0, |b| b[r]);
        for i in 0..t {
            x[i * h + r] += y[r * t + i] + b;
        }
    }
}

/// Rotates every head of `x` (`[heads * d]`) by the token's angles.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], d: usize, layout: RopeLayout) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        for i in 0..half {
            let (a, b) = match layout {
                RopeLayout::Halves => (i, i + half),
                RopeLayout::Adjacent => (2 * i, 2 * i + 1),
            };
            let (x1, x2) = (head[a], head[b]);
            head[a] = x1 * cos[i] - x2 * sin[i];
            head[b] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

#[derive(Clone, Copy)]
struct AttnShape {
    nh: usize,
    nkv: usize,
    d: usize,
    scale: f32,
    window: Option<usize>,
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Causal attention of each token's query heads over its row's cached keys and values.
#[allow(clippy::too_many_arguments)]
fn attention(
    tokens: &[TokenIn],
    q: &[f32],
    cache: &KvCache,
    layer: usize,
    a: AttnShape,
    simd: bool,
    out: &mut [f32],
) {
    let (nh, d) = (a.nh, a.d);
    let group = nh / a.nkv;
    // One unit per token and key/value head: its `group` query heads are contiguous in `q` and
    // `out`, and read each cached key and value once.
    let work = |(idx, o): (usize, &mut [f32])| {
        let (ti, kvh) = (idx / a.nkv, idx % a.nkv);
        let tok = tokens[ti];
        let at = ti * nh * d + kvh * group * d;
        let qs = &q[at..at + group * d];
        let first = match a.window {
            Some(w) => (tok.slot + 1).saturating_sub(w),
            None => 0,
        };
        let spans = cache_spans(cache.shared[tok.row], tok.row, first, tok.slot).map(|span| {
            span.map(|(row, from, n)| {
                let base = cache.at(layer, row, kvh, from);
                let end = base + n * d;
                (&cache.k[base..end], &cache.v[base..end], n)
            })
        });
        SCORES.with(|cell| {
            quant::attend_group(qs, spans, d, a.scale, &mut cell.borrow_mut(), o, simd);
        });
    };
    let span: usize = tokens.iter().map(|t| t.slot + 1).sum::<usize>() * nh;
    if span * d < 1 << 15 {
        out.chunks_mut(group * d).enumerate().for_each(work);
    } else {
        out.par_chunks_mut(group * d).enumerate().for_each(work);
    }
}

#[cfg(test)]
mod span_tests {
    use super::cache_spans;

    #[test]
    fn a_shared_prefix_splits_the_attended_slots_where_it_ends() {
        // Row 3 reads slots 0..5 from row 1.
        let shared = Some((1, 5));
        assert_eq!(
            cache_spans(shared, 3, 0, 8),
            [Some((1, 0, 5)), Some((3, 5, 4))]
        );
        // Still inside the prefix (prefill of the source is over; a window may start inside).
        assert_eq!(cache_spans(shared, 3, 2, 4), [Some((1, 2, 3)), None]);
        assert_eq!(
            cache_spans(shared, 3, 4, 5),
            [Some((1, 4, 1)), Some((3, 5, 1))]
        );
        // A sliding window past the prefix reads the row's own slots only.
        assert_eq!(cache_spans(shared, 3, 6, 9), [Some((3, 6, 4)), None]);
        assert_eq!(cache_spans(None, 3, 0, 2), [Some((3, 0, 3)), None]);
    }
}
