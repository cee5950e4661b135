//! GPU benchmarks and checks of the fast kernels on burn-cuda, printed as JSON lines that
//! `scripts/bench_torch.py` joins with PyTorch's numbers for the same shapes.
//!
//! Reference: shapes from Qwen2.5-0.5B/7B `config.json` (hidden 896/3584, intermediate
//! 4864/18944, 14/28 query heads, 2/4 KV heads); FLOP counts as in FlashAttention's benchmarks
//! (causal attention forward `2 * 2 * b * h * s^2 * d / 2`, backward 2.5x the forward).

use std::time::Instant;

use burn::backend::{Autodiff, Cuda};
use burn::tensor::{backend::Backend, DType, Distribution, Int, Tensor, TensorData};

use crate::backend::attention::{attention, AttentionOptions};
use crate::backend::cuda::device_memory_used;
use crate::backend::{linear_cross_entropy, matmul, Error};

type B = Cuda;
type Ad = Autodiff<Cuda>;

/// One measurement, one JSON line.
pub struct Record {
    pub name: String,
    pub ms: f64,
    pub tflops: f64,
    pub mem_gib: f64,
}

impl Record {
    pub fn json(&self) -> String {
        format!(
            "{{\"impl\":\"burn\",\"name\":\"{}\",\"ms\":{:.4},\"tflops\":{:.1},\"mem_gib\":{:.3}}}",
            self.name, self.ms, self.tflops, self.mem_gib
        )
    }
}

fn device() -> burn::tensor::Device<B> {
    Default::default()
}

fn sync() -> Result<(), Error> {
    B::sync(&device()).map_err(|e| Error::Cuda {
        call: "burn sync",
        detail: format!("{e:?}"),
    })
}

fn mem_gib(base: usize) -> Result<f64, Error> {
    Ok(device_memory_used(0)?.saturating_sub(base) as f64 / (1u64 << 30) as f64)
}

fn randn<BK: Backend, const D: usize>(
    shape: [usize; D],
    dtype: DType,
    dev: &BK::Device,
) -> Tensor<BK, D> {
    Tensor::<BK, D>::random(shape, Distribution::Normal(0.0, 1.0), dev).cast(dtype)
}

/// Mean milliseconds per call of `f` after `warmup` calls, synchronizing at both ends.
fn time(warmup: usize, iters: usize, mut f: impl FnMut()) -> Result<f64, Error> {
    for _ in 0..warmup {
        f();
    }
    sync()?;
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
}

/// `[m, k] x [k, n]` shapes: 8192^3 and the Qwen2.5 projections at 8 x 1024 tokens (weights in
/// HF `[out, in]` layout, read transposed).
pub fn matmul_shapes() -> Vec<(String, usize, usize, usize, bool)> {
    let tokens = 8 * 1024;
    let mut shapes = vec![("gemm_8192".to_string(), 8192, 8192, 8192, false)];
    for (model, hidden, inter, kv) in [("0.5b", 896, 4864, 128), ("7b", 3584, 18944, 512)] {
        for (proj, k, n) in [
            ("q", hidden, hidden),
            ("kv", hidden, kv),
            ("o", hidden, hidden),
            ("gate_up", hidden, inter),
            ("down", inter, hidden),
        ] {
            shapes.push((format!("{model}_{proj}"), tokens, k, n, true));
        }
    }
    shapes
}

/// bf16 matmul throughput through cuBLAS; `with_burn` adds burn's own matmul on each shape.
pub fn bench_matmul(with_burn: bool) -> Result<Vec<Record>, Error> {
    crate::backend::cuda::set_min_cublas_macs(0);
    let dev = device();
    let mut out = Vec::new();
    for (name, m, k, n, weight_layout) in matmul_shapes() {
        sync()?;
        let base = device_memory_used(0)?;
        let x = randn::<B, 3>([1, m, k], DType::BF16, &dev);
        let w = if weight_layout {
            randn::<B, 2>([n, k], DType::BF16, &dev)
                .transpose()
                .unsqueeze_dim::<3>(0)
        } else {
            randn::<B, 3>([1, k, n], DType::BF16, &dev)
        };
        let iters = if m * k * n > 100_000_000_000 { 20 } else { 50 };
        let ms = time(3, iters, || {
            let _ = matmul(x.clone(), w.clone());
        })?;
        let flops = 2.0 * (m * k * n) as f64;
        out.push(Record {
            name: name.clone(),
            ms,
            tflops: flops / ms / 1e9,
            mem_gib: mem_gib(base)?,
        });
        if with_burn {
            let ms = time(3, 10, || {
                let _ = x.clone().matmul(w.clone());
            })?;
            out.push(Record {
                name: format!("{name}_burn_native"),
                ms,
                tflops: flops / ms / 1e9,
                mem_gib: mem_gib(base)?,
            });
        }
    }
    crate::backend::cuda::set_min_cublas_macs(crate::backend::cuda::DEFAULT_MIN_CUBLAS_MACS);
    Ok(out)
}

/// Causal GQA attention forward + backward in bf16 (14 query heads, 2 KV heads, head dim 64):
/// the fused kernels the decoder uses (`attn_fwd_bwd_*`) and the composed attention with its
/// score matrix (`attn_composed_fwd_bwd_*`).
pub fn bench_attention() -> Result<Vec<Record>, Error> {
    let dev = device();
    let mut out = Vec::new();
    for (batch, seq) in [(8usize, 1024usize), (2, 4096)] {
        let (hq, hkv, d) = (14, 2, 64);
        let fwd = 4.0 * (batch * hq * seq * seq * d) as f64 / 2.0;
        for fused in [true, false] {
            sync()?;
            let base = device_memory_used(0)?;
            let q = randn::<Ad, 4>([batch, hq, seq, d], DType::BF16, &dev).require_grad();
            let k = randn::<Ad, 4>([batch, hkv, seq, d], DType::BF16, &dev).require_grad();
            let v = randn::<Ad, 4>([batch, hkv, seq, d], DType::BF16, &dev).require_grad();
            let mut failure = None;
            let spec = crate::backend::FusedAttentionSpec {
                scale: 1.0 / (d as f64).sqrt(),
                causal: true,
            };
            let ms = time(2, 10, || {
                let o = if fused {
                    Ok(crate::backend::fused_attention(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        None,
                        spec,
                    ))
                } else {
                    attention(q.clone(), k.clone(), v.clone(), AttentionOptions::default())
                };
                match o {
                    Ok(o) => {
                        let _ = o.cast(DType::F32).sum().backward();
                    }
                    Err(e) => failure = Some(e),
                }
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            let kind = if fused { "attn" } else { "attn_composed" };
            if fused {
                // The forward pass alone, without autodiff (what prefill and decoding run).
                let (qi, ki, vi) = (q.clone().inner(), k.clone().inner(), v.clone().inner());
                let fwd_ms = time(2, 10, || {
                    let o = crate::backend::fused_attention(
                        qi.clone(),
                        ki.clone(),
                        vi.clone(),
                        None,
                        spec,
                    );
                    let _ = o.sum();
                })?;
                out.push(Record {
                    name: format!("attn_fwd_b{batch}_s{seq}"),
                    ms: fwd_ms,
                    tflops: fwd / fwd_ms / 1e9,
                    mem_gib: mem_gib(base)?,
                });
            }
            out.push(Record {
                name: format!("{kind}_fwd_bwd_b{batch}_s{seq}"),
                ms,
                tflops: 3.5 * fwd / ms / 1e9,
                mem_gib: mem_gib(base)?,
            });
        }
    }
    Ok(out)
}

/// Chunked LM-head cross-entropy forward + backward, Qwen2.5-0.5B head (896 x 151936), 8192
/// tokens, bf16, chunk 2048 tokens.
pub fn bench_cross_entropy() -> Result<Vec<Record>, Error> {
    let dev = device();
    let (n, d, v) = (8192, 896, 151_936);
    sync()?;
    let base = device_memory_used(0)?;
    let h = randn::<Ad, 2>([n, d], DType::BF16, &dev).require_grad();
    let w = randn::<Ad, 2>([v, d], DType::BF16, &dev).mul_scalar(0.02);
    let labels = Tensor::<Ad, 1, Int>::from_data(
        TensorData::new(
            (0..n as i64)
                .map(|i| (i * 7919) % v as i64)
                .collect::<Vec<_>>(),
            [n],
        ),
        &dev,
    );
    let ms = time(2, 10, || {
        let loss = linear_cross_entropy(h.clone(), w.clone(), labels.clone(), 2048);
        let _ = loss.backward();
    })?;
    out_one(
        "ce_fwd_bwd_0.5b_8192tok",
        ms,
        3.0 * 2.0 * (n * d * v) as f64,
        mem_gib(base)?,
    )
}

fn out_one(name: &str, ms: f64, flops: f64, mem: f64) -> Result<Vec<Record>, Error> {
    Ok(vec![Record {
        name: name.into(),
        ms,
        tflops: flops / ms / 1e9,
        mem_gib: mem,
    }])
}
