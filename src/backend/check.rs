//! GPU correctness checks of the fast kernels: the cuBLAS matmul against burn's own matmul on
//! the same device (f32 within 1e-4, bf16 within 1e-2 relative), and dumps of inputs, outputs and
//! gradients (matmul, chunked cross-entropy, attention) that `scripts/check_torch.py` recomputes
//! with PyTorch autograd on the same inputs.
//!
//! Reference: PyTorch `F.linear`, `F.cross_entropy(ignore_index=-100)`,
//! `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`.

use std::fmt::Write as _;
use std::path::Path;

use burn::backend::{Autodiff, Cuda};
use burn::tensor::{
    backend::Backend, DType, Distribution, Int, Tensor, TensorData, TensorPrimitive,
};

use crate::backend::attention::{attention, AttentionOptions};
use crate::backend::{linear, linear_cross_entropy, matmul, Error};

type B = Cuda;
type Ad = Autodiff<Cuda>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Cuda {
        call: "write check dump",
        detail: format!("{}: {e}", path.display()),
    }
}

fn host<BK: Backend, const D: usize>(t: Tensor<BK, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    // A NaN or infinity anywhere fails the check (`max` would skip it).
    if got.iter().chain(want).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs())) as f64;
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    diff / scale
}

/// `a [b, m, k] @ c [b | 1, k, n]` on the host in f64 from the operands' values: the reference
/// of the GEMM checks (burn's own f32 matmul on the GPU can round like TF32, 3e-4 apart).
fn host_matmul<BK: Backend>(a: Tensor<BK, 3>, c: Tensor<BK, 3>) -> Vec<f32> {
    let ([batch, m, k], [cb, _, n]) = (a.dims(), c.dims());
    let (a, c) = (host(a), host(c));
    let mut out = vec![0f32; batch * m * n];
    for bi in 0..batch {
        let cbi = if cb == 1 { 0 } else { bi };
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|l| a[(bi * m + i) * k + l] as f64 * c[(cbi * k + l) * n + j] as f64)
                    .sum();
                out[(bi * m + i) * n + j] = dot as f32;
            }
        }
    }
    out
}

fn randn<BK: Backend, const D: usize>(shape: [usize; D], dtype: DType) -> Tensor<BK, D> {
    Tensor::<BK, D>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default()).cast(dtype)
}

/// Writes `<name>.bin` (f32, little endian) and a manifest line `name dim dim ..`.
struct Dump<'a> {
    dir: &'a Path,
    manifest: String,
}

impl Dump<'_> {
    fn put<BK: Backend, const D: usize>(
        &mut self,
        name: &str,
        t: Tensor<BK, D>,
    ) -> Result<(), Error> {
        let dims = t.dims();
        let data = host(t);
        let path = self.dir.join(format!("{name}.bin"));
        std::fs::write(&path, bytemuck::cast_slice::<f32, u8>(&data)).map_err(io(&path))?;
        let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        let _ = writeln!(self.manifest, "{name} {}", dims.join(" "));
        Ok(())
    }
}

/// Runs the on-device comparisons, writes the dumps into `dir`, returns one line per check and
/// whether all passed.
pub fn run_checks(dir: &Path) -> Result<(Vec<String>, bool), Error> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Every product through cuBLAS, however small, so the checks exercise it.
    crate::backend::cuda::set_min_cublas_macs(0);
    let mut lines = Vec::new();
    let mut ok = true;

    // 1. cuBLAS vs the host in f64: broadcast batch, transposed and sliced operands.
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 1e-2), (DType::F16, 1e-2)] {
        let a = randn::<B, 3>([3, 257, 129], dtype);
        let w = randn::<B, 2>([65, 129], dtype);
        let wide = randn::<B, 3>([3, 257, 200], dtype);
        let cases: Vec<(&str, Tensor<B, 3>, Tensor<B, 3>)> = vec![
            ("plain", a.clone(), randn::<B, 3>([3, 129, 65], dtype)),
            (
                "weight_t_broadcast",
                a.clone(),
                w.clone().transpose().unsqueeze_dim(0),
            ),
            (
                "lhs_t",
                a.clone().swap_dims(1, 2).swap_dims(1, 2),
                w.clone().transpose().unsqueeze_dim(0),
            ),
            (
                "lhs_slice",
                wide.slice([0..3, 0..257, 10..139]),
                w.transpose().unsqueeze_dim(0),
            ),
            (
                "both_t",
                randn::<B, 3>([3, 129, 257], dtype).swap_dims(1, 2),
                randn::<B, 3>([3, 65, 129], dtype).swap_dims(1, 2),
            ),
        ];
        for (name, lhs, rhs) in cases {
            let want = host_matmul(lhs.clone(), rhs.clone());
            let got = host(matmul(lhs, rhs));
            let err = rel_err(&got, &want);
            let pass = err <= tol;
            ok &= pass;
            lines.push(format!(
                "{} matmul {dtype:?} {name}: rel err {err:.2e} (limit {tol:.0e})",
                if pass { "PASS" } else { "FAIL" }
            ));
        }
    }

    // 2. Dumps for PyTorch: linear + gradients, chunked CE, attention, in f32 and bf16.
    let mut dump = Dump {
        dir,
        manifest: String::new(),
    };
    for (tag, dtype) in [("f32", DType::F32), ("bf16", DType::BF16)] {
        let x = randn::<Ad, 3>([2, 64, 96], dtype).require_grad();
        let w = randn::<Ad, 2>([80, 96], dtype).require_grad();
        let g = randn::<Ad, 3>([2, 64, 80], dtype);
        let y = linear(x.clone().reshape([128, 96]), w.clone()).reshape([2, 64, 80]);
        let grads = (y.clone().cast(DType::F32) * g.clone().cast(DType::F32))
            .sum()
            .backward();
        dump.put(&format!("linear_{tag}_x"), x.clone())?;
        dump.put(&format!("linear_{tag}_w"), w.clone())?;
        dump.put(&format!("linear_{tag}_g"), g)?;
        dump.put(&format!("linear_{tag}_y"), y)?;
        dump.put(
            &format!("linear_{tag}_dx"),
            x.grad(&grads).ok_or(missing("dx"))?,
        )?;
        dump.put(
            &format!("linear_{tag}_dw"),
            w.grad(&grads).ok_or(missing("dw"))?,
        )?;

        let (n, d, v) = (300, 64, 1000);
        let h = randn::<Ad, 2>([n, d], dtype).require_grad();
        let wh = randn::<Ad, 2>([v, d], dtype).require_grad();
        let labels: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 7 == 3 {
                    -100
                } else {
                    (i * 37) % v as i64
                }
            })
            .collect();
        let labels_t = Tensor::<Ad, 1, Int>::from_data(
            TensorData::new(labels.clone(), [n]),
            &Default::default(),
        );
        let loss = linear_cross_entropy(h.clone(), wh.clone(), labels_t.clone(), 128);
        let grads = loss.clone().backward();
        dump.put(&format!("ce_{tag}_h"), h.clone())?;
        dump.put(&format!("ce_{tag}_w"), wh.clone())?;
        dump.put(&format!("ce_{tag}_labels"), labels_t.float())?;
        dump.put(&format!("ce_{tag}_loss"), loss)?;
        dump.put(
            &format!("ce_{tag}_dh"),
            h.grad(&grads).ok_or(missing("dh"))?,
        )?;
        dump.put(
            &format!("ce_{tag}_dw"),
            wh.grad(&grads).ok_or(missing("dw"))?,
        )?;

        let q = randn::<Ad, 4>([2, 4, 33, 16], dtype).require_grad();
        let k = randn::<Ad, 4>([2, 2, 33, 16], dtype).require_grad();
        let vv = randn::<Ad, 4>([2, 2, 33, 16], dtype).require_grad();
        let go = randn::<Ad, 4>([2, 4, 33, 16], dtype);
        let o = attention(
            q.clone(),
            k.clone(),
            vv.clone(),
            AttentionOptions::default(),
        )?;
        let grads = (o.clone().cast(DType::F32) * go.clone().cast(DType::F32))
            .sum()
            .backward();
        dump.put(&format!("attn_{tag}_q"), q.clone())?;
        dump.put(&format!("attn_{tag}_k"), k.clone())?;
        dump.put(&format!("attn_{tag}_v"), vv.clone())?;
        dump.put(&format!("attn_{tag}_go"), go)?;
        dump.put(&format!("attn_{tag}_o"), o)?;
        dump.put(
            &format!("attn_{tag}_dq"),
            q.grad(&grads).ok_or(missing("dq"))?,
        )?;
        dump.put(
            &format!("attn_{tag}_dk"),
            k.grad(&grads).ok_or(missing("dk"))?,
        )?;
        dump.put(
            &format!("attn_{tag}_dv"),
            vv.grad(&grads).ok_or(missing("dv"))?,
        )?;
    }
    // 3. Fused attention in bf16: GQA, lengths off the 64-row tiles, left padding, queries at
    //    the end of a longer key range (prefill after a cache, decoding). Causal cases with
    //    equal lengths and no padding run on cuDNN where it loads; `*_kernels` runs them on the
    //    flash kernels.
    let fused = crate::backend::fused_attention_supported::<Ad>(DType::BF16, 64)
        && crate::backend::fused_attention_supported::<Ad>(DType::BF16, 128);
    lines.push(format!(
        "{} fused attention kernels in use for bf16 head dims 64 and 128",
        if fused { "PASS" } else { "FAIL" }
    ));
    ok &= fused;
    // (name, batch, heads, kv heads, q_len, k_len, head dim, left padding of batch row 1)
    let cases = [
        ("gqa_t100", 2, 4, 2, 100, 100, 64, 0),
        ("pad_offset_d128", 2, 6, 2, 37, 150, 128, 20),
        ("decode_pad", 3, 4, 4, 1, 77, 64, 9),
        ("long_d64", 1, 14, 2, 300, 300, 64, 0),
        ("gqa_t100_kernels", 2, 4, 2, 100, 100, 64, 0),
        ("long_d128_kernels", 1, 6, 2, 300, 300, 128, 0),
        ("long_d128", 1, 6, 2, 300, 300, 128, 0),
    ];
    for (name, b, h, kvh, t, s, d, pad) in cases {
        #[cfg(feature = "cuda")]
        crate::backend::cuda::cudnn_attention::set_enabled(!name.ends_with("_kernels"));
        let q = randn::<Ad, 4>([b, h, t, d], DType::BF16).require_grad();
        let k = randn::<Ad, 4>([b, kvh, s, d], DType::BF16).require_grad();
        let vv = randn::<Ad, 4>([b, kvh, s, d], DType::BF16).require_grad();
        let go = randn::<Ad, 4>([b, t, h, d], DType::BF16);
        let valid: Vec<i64> = (0..b * s)
            .map(|i| i64::from(!(i / s == 1 && i % s < pad)))
            .collect();
        let valid = (pad > 0).then(|| {
            Tensor::<Ad, 2, Int>::from_data(TensorData::new(valid, [b, s]), &Default::default())
        });
        let spec = crate::backend::FusedAttentionSpec {
            scale: 1.0 / (d as f64).sqrt(),
            causal: true,
        };
        let o =
            crate::backend::fused_attention(q.clone(), k.clone(), vv.clone(), valid.clone(), spec);
        let grads = (o.clone().cast(DType::F32) * go.clone().cast(DType::F32))
            .sum()
            .backward();
        let key_valid = match valid {
            Some(m) => m.float(),
            None => Tensor::<Ad, 2>::ones([b, s], &Default::default()),
        };
        dump.put(&format!("flash_{name}_q"), q.clone())?;
        dump.put(&format!("flash_{name}_k"), k.clone())?;
        dump.put(&format!("flash_{name}_v"), vv.clone())?;
        dump.put(&format!("flash_{name}_valid"), key_valid)?;
        dump.put(&format!("flash_{name}_go"), go)?;
        dump.put(&format!("flash_{name}_o"), o)?;
        dump.put(
            &format!("flash_{name}_dq"),
            q.grad(&grads).ok_or(missing("dq"))?,
        )?;
        dump.put(
            &format!("flash_{name}_dk"),
            k.grad(&grads).ok_or(missing("dk"))?,
        )?;
        dump.put(
            &format!("flash_{name}_dv"),
            vv.grad(&grads).ok_or(missing("dv"))?,
        )?;
    }

    #[cfg(feature = "cuda")]
    crate::backend::cuda::cudnn_attention::set_enabled(true);
    #[cfg(feature = "cuda")]
    check_cudnn_attention(&mut lines, &mut ok);

    let path = dir.join("manifest.txt");
    std::fs::write(&path, &dump.manifest).map_err(io(&path))?;
    lines.push(format!(
        "dumped {} tensors to {}",
        dump.manifest.lines().count(),
        dir.display()
    ));
    check_adamw(&mut lines, &mut ok);
    check_cross_entropy_rows(&mut lines, &mut ok);
    check_rms_norm(&mut lines, &mut ok);
    check_rope(&mut lines, &mut ok);
    check_lora(&mut lines, &mut ok);
    check_nf4::<Cuda<f32, i32>>(&mut lines, &mut ok);
    check_nf4::<Cuda<half::bf16, i32>>(&mut lines, &mut ok);
    Ok((lines, ok))
}

/// `op(a) op(b)` in f64 for row-major `a` and `b`, `op` transposing where asked; `m x n` out.
fn host_gemm(
    a: &[f64],
    b: &[f64],
    (m, k, n): (usize, usize, usize),
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
    let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
        }
    }
    out
}

/// 5. The LoRA projection node (cuBLAS with alpha/beta) against the host in f64 from the
///    operands' values: output and the gradients of x, A, B (and of W where it trains).
fn check_lora(lines: &mut Vec<String>, ok: &mut bool) {
    let (n, inp, out, r, scale) = (300, 96, 80, 8, 2.0);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
        let inputs = [
            randn::<B, 2>([n, inp], dtype),
            randn::<B, 2>([out, inp], dtype),
            randn::<B, 2>([r, inp], dtype),
            randn::<B, 2>([out, r], dtype),
            randn::<B, 2>([n, out], dtype),
        ];
        let [x, w, a, b, dy] = inputs
            .clone()
            .map(|t| host(t).into_iter().map(f64::from).collect::<Vec<f64>>());
        let axpy = |p: Vec<f64>, q: Vec<f64>, s: f64| -> Vec<f64> {
            p.iter().zip(&q).map(|(p, q)| p + s * q).collect()
        };
        let u = host_gemm(&x, &a, (n, inp, r), false, true);
        let t = host_gemm(&dy, &b, (n, out, r), false, false);
        let want_y = axpy(
            host_gemm(&x, &w, (n, inp, out), false, true),
            host_gemm(&u, &b, (n, r, out), false, true),
            scale,
        );
        let want_dx = axpy(
            host_gemm(&dy, &w, (n, out, inp), false, false),
            host_gemm(&t, &a, (n, r, inp), false, false),
            scale,
        );
        let scaled = |v: Vec<f64>| v.into_iter().map(|x| x * scale).collect::<Vec<f64>>();
        let want_dw = host_gemm(&dy, &x, (out, n, inp), true, false);
        let want_da = scaled(host_gemm(&t, &x, (r, n, inp), true, false));
        let want_db = scaled(host_gemm(&dy, &u, (out, n, r), true, false));
        for trains_w in [false, true] {
            let [x, w, a, b, dy] = inputs.clone().map(Tensor::<Ad, 2>::from_inner);
            let (x, a, b) = (x.require_grad(), a.require_grad(), b.require_grad());
            let w = if trains_w { w.require_grad() } else { w };
            let y = crate::backend::lora_linear(x.clone(), w.clone(), a.clone(), b.clone(), scale);
            let grads = y.clone().mul(dy).sum().backward();
            let g = |t: &Tensor<Ad, 2>| t.grad(&grads).map(host).unwrap_or_default();
            let got = [host(y.inner()), g(&x), g(&w), g(&a), g(&b)];
            let want = [&want_y, &want_dx, &want_dw, &want_da, &want_db];
            for (i, what) in ["y", "dx", "dW", "dA", "dB"].iter().enumerate() {
                if *what == "dW" && !trains_w {
                    continue;
                }
                let want: Vec<f32> = want[i].iter().map(|&v| v as f32).collect();
                let err = rel_err(&got[i], &want);
                let pass = err <= tol;
                *ok &= pass;
                lines.push(format!(
                    "{} lora {dtype:?} trains_w={trains_w} {what}: rel err {err:.2e} (limit {tol:.0e})",
                    if pass { "PASS" } else { "FAIL" }
                ));
            }
        }
    }
}

/// 4. The AdamW kernels against the same update from burn's ops on the same GPU, all cases in
///    one call (so in one group or more): f32 or bf16 gradients, with and without weight decay,
///    a bf16 copy or none, first and later steps, lengths off the chunk size, a tensor of many
///    chunks, and more tensors than one launch takes. The kernel gets tensors of its own (it
///    may write over them); the reference gets copies. Then the sum of squares of every
///    gradient against the host's f64 sum.
fn check_adamw(lines: &mut Vec<String>, ok: &mut bool) {
    use crate::backend::adamw::{composed, AdamwStep, AdamwTensors};
    use burn::tensor::FloatDType;
    let mut cases: Vec<(String, usize, DType, f64, Option<FloatDType>, u64)> = vec![
        ("grad_f32".into(), 100_003, DType::F32, 0.0, None, 1),
        (
            "grad_bf16_low".into(),
            100_003,
            DType::BF16,
            0.1,
            Some(FloatDType::BF16),
            1,
        ),
        (
            "grad_bf16_step7".into(),
            1_500_001,
            DType::BF16,
            0.1,
            Some(FloatDType::BF16),
            7,
        ),
        ("grad_f32_wd".into(), 4_097, DType::F32, 0.01, None, 3),
    ];
    // Past one launch's table (40 tensors): small LoRA-like tensors, both gradient types.
    for k in 0..45usize {
        let dtype = if k % 3 == 0 { DType::F32 } else { DType::BF16 };
        let low = (dtype == DType::BF16).then_some(FloatDType::BF16);
        cases.push((format!("small{k}"), 1 + 997 * k, dtype, 0.1, low, 2));
    }
    let copy = |t: &Tensor<B, 1>| Tensor::<B, 1>::from_data(t.to_data(), &Default::default());
    let scale = Tensor::<B, 1>::from_floats([0.37], &Default::default());
    let mut params = Vec::new();
    let mut refs = Vec::new();
    let mut grads = Vec::new();
    for (_, n, grad_dtype, weight_decay, low, step) in &cases {
        let weights = randn::<B, 1>([*n], DType::F32);
        let grad = randn::<B, 1>([*n], *grad_dtype);
        let exp_avg = randn::<B, 1>([*n], DType::F32).mul_scalar(0.1);
        let exp_avg_sq = randn::<B, 1>([*n], DType::F32)
            .powi_scalar(2)
            .mul_scalar(0.01);
        let hp = AdamwStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: *weight_decay,
            step: *step,
        };
        refs.push(composed(
            copy(&weights),
            copy(&grad).cast(DType::F32),
            copy(&exp_avg),
            copy(&exp_avg_sq),
            Some(scale.clone()),
            hp,
            *low,
        ));
        grads.push(copy(&grad));
        let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
        params.push(AdamwTensors {
            weights: prim(weights),
            grad: prim(grad),
            exp_avg: prim(exp_avg),
            exp_avg_sq: prim(exp_avg_sq),
            hp,
            low: *low,
        });
    }
    let fused =
        crate::backend::adamw_update_many::<B>(params, Some(scale.into_primitive().tensor()));
    let float = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
    let mut worst: Vec<(String, f64, f64)> = Vec::new();
    for ((name, ..), (got, want)) in cases.iter().zip(fused.into_iter().zip(refs)) {
        let mut errs = vec![
            (
                "weights",
                rel_err(&host(float(got.weights)), &host(want.weights)),
                1e-6,
            ),
            (
                "exp_avg",
                rel_err(&host(float(got.exp_avg)), &host(want.exp_avg)),
                1e-6,
            ),
            (
                "exp_avg_sq",
                rel_err(&host(float(got.exp_avg_sq)), &host(want.exp_avg_sq)),
                1e-6,
            ),
        ];
        match (got.low, want.low) {
            (Some(got), Some(want)) => {
                errs.push(("bf16 copy", rel_err(&host(float(got)), &host(want)), 1e-2))
            }
            (None, None) => {}
            _ => errs.push(("bf16 copy present in one only", f64::INFINITY, 0.0)),
        }
        // The named cases get a line each; the small ones one line for the worst of them.
        for (what, err, tol) in errs {
            if name.starts_with("small") {
                match worst.iter_mut().find(|(w, ..)| w == what) {
                    Some(entry) => entry.1 = entry.1.max(err),
                    None => worst.push((what.to_string(), err, tol)),
                }
                continue;
            }
            let pass = err <= tol;
            *ok &= pass;
            lines.push(format!(
                "{} adamw {name} {what}: rel err {err:.2e} (limit {tol:.0e})",
                if pass { "PASS" } else { "FAIL" }
            ));
        }
    }
    for (what, err, tol) in worst {
        let pass = err <= tol;
        *ok &= pass;
        lines.push(format!(
            "{} adamw 45 small tensors (two launches) {what}: worst rel err {err:.2e} (limit {tol:.0e})",
            if pass { "PASS" } else { "FAIL" }
        ));
    }
    let want: f64 = grads
        .iter()
        .flat_map(|g| host(g.clone()))
        .map(|x| f64::from(x) * f64::from(x))
        .sum();
    let grads = grads
        .into_iter()
        .map(|g| g.into_primitive().tensor())
        .collect();
    let got = host(crate::backend::sum_squares::<B>(grads, &Default::default()))[0];
    let err = (f64::from(got) - want).abs() / want;
    let pass = err <= 1e-5;
    *ok &= pass;
    lines.push(format!(
        "{} sum of squares of {} gradients: {got} against {want:.6} (rel err {err:.2e}, limit 1e-5)",
        if pass { "PASS" } else { "FAIL" },
        cases.len()
    ));
}

/// 5. The cross-entropy rows kernel against burn's ops on the same GPU: bf16 and f32 logits, a
///    vocabulary that splits into 4-element loads and one that does not, ignored rows.
fn check_cross_entropy_rows(lines: &mut Vec<String>, ok: &mut bool) {
    use crate::backend::cross_entropy::rows_reference;
    for dtype in [DType::F32, DType::BF16] {
        for vocab in [1000usize, 999] {
            let rows = 37;
            let logits = randn::<B, 2>([rows, vocab], dtype).mul_scalar(3.0);
            let labels: Vec<i32> = (0..rows as i32)
                .map(|i| {
                    if i % 5 == 2 {
                        -100
                    } else {
                        (i * 131) % vocab as i32
                    }
                })
                .collect();
            let labels = Tensor::<B, 1, Int>::from_data(
                TensorData::new(labels, [rows]),
                &Default::default(),
            );
            let inv_count = Tensor::<B, 1>::from_floats([1.0 / 29.0], &Default::default());
            let copy =
                |t: &Tensor<B, 2>| Tensor::<B, 2>::from_data(t.to_data(), &Default::default());
            let (want_loss, want_grad) =
                rows_reference(copy(&logits), labels.clone(), inv_count.clone(), true);
            let (got_loss, got_grad) =
                crate::backend::cross_entropy_rows(logits, labels, inv_count, true);
            let loss_err = rel_err(&host(got_loss), &host(want_loss));
            let grad_err = match (got_grad, want_grad) {
                (Some(g), Some(w)) => rel_err(&host(g), &host(w)),
                _ => f64::INFINITY,
            };
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            for (what, err) in [("loss", loss_err), ("grad", grad_err)] {
                let pass = err <= tol;
                *ok &= pass;
                lines.push(format!(
                    "{} cross-entropy rows {dtype:?} vocab {vocab} {what}: rel err {err:.2e} (limit {tol:.0e})",
                    if pass { "PASS" } else { "FAIL" }
                ));
            }
        }
    }
}

/// 6. The RMSNorm kernels against burn's ops on the same GPU: output and input gradient, bf16
///    and f32, a hidden size of the 0.5B model and one off the warp width.
fn check_rms_norm(lines: &mut Vec<String>, ok: &mut bool) {
    use crate::backend::dispatch::{composed_rms_norm, composed_rms_norm_backward};
    use crate::backend::FastOps;
    for dtype in [DType::F32, DType::BF16] {
        for hidden in [896usize, 100] {
            let rows = 67;
            let x = randn::<B, 2>([rows, hidden], dtype).mul_scalar(2.0);
            let w = randn::<B, 1>([hidden], dtype);
            let dy = randn::<B, 2>([rows, hidden], dtype);
            let prim = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();
            let (y, inv) =
                B::fast_rms_norm_forward(prim(&x), w.clone().into_primitive().tensor(), 1e-6);
            let (dx, _) = B::fast_rms_norm_backward(
                prim(&x),
                w.clone().into_primitive().tensor(),
                inv,
                prim(&dy),
                (true, false),
            );
            let (want_y, want_inv) = composed_rms_norm(x.clone(), w.clone(), 1e-6);
            let (want_dx, _) = composed_rms_norm_backward::<B>(
                prim(&x),
                w.into_primitive().tensor(),
                want_inv.into_primitive().tensor(),
                prim(&dy),
                (true, false),
            );
            let float = |t| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
            let y_err = rel_err(&host(float(y)), &host(want_y));
            let dx_err = match (dx, want_dx) {
                (Some(g), Some(w)) => rel_err(&host(float(g)), &host(float(w))),
                _ => f64::INFINITY,
            };
            // burn's bf16 path rounds the inverse RMS to bf16 first: agreement to bf16's
            // resolution is what can be asked.
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            for (what, err) in [("y", y_err), ("dx", dx_err)] {
                let pass = err <= tol;
                *ok &= pass;
                lines.push(format!(
                    "{} rms_norm {dtype:?} hidden {hidden} {what}: rel err {err:.2e} (limit {tol:.0e})",
                    if pass { "PASS" } else { "FAIL" }
                ));
            }
        }
    }
}

/// The NF4 dequantization kernel against burn's ops on the same GPU, in the backend's float
/// type: a shape whose last block is short and whose blocks span two absmax groups. The packed
/// words, codes and tables are arbitrary bits and values: every nibble and absmax code indexes
/// its table, so both paths see the whole input range.
fn check_nf4<BK: Backend>(lines: &mut Vec<String>, ok: &mut bool) {
    use crate::backend::nf4::{Nf4Parts, ABSMAX_BLOCK, NF4_BLOCK};
    let (out, inp) = (300usize, 70usize);
    let blocks = (out * inp).div_ceil(NF4_BLOCK);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut word = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 32) as u32 as i32
    };
    let device = Default::default();
    let mut ints = |n: usize| {
        let words: Vec<i32> = (0..n).map(|_| word()).collect();
        Tensor::<BK, 1, Int>::from_data(TensorData::new(words, [n]), &device)
    };
    let packed = ints(blocks * NF4_BLOCK / 8);
    let absmax_codes = ints(blocks.div_ceil(4));
    // In the backend's float type: the kernel writes the dtype of the code table, and
    // `random` draws f32 whatever the backend's default.
    let float = burn::tensor::FloatDType::from(<BK::FloatElem as burn::tensor::Element>::dtype());
    let floats = |n: usize, scale: f64| {
        Tensor::<BK, 1>::random([n], Distribution::Normal(0.0, scale), &device).cast(float)
    };
    let scales = floats(blocks.div_ceil(ABSMAX_BLOCK), 0.1);
    let (code, dynamic) = (floats(16, 1.0), floats(256, 1.0));
    let offset = 0.0125;
    let want = Tensor::<BK, 2>::from_primitive(TensorPrimitive::Float(
        crate::backend::nf4::composed::<BK>(Nf4Parts {
            packed: packed.clone().into_primitive(),
            absmax_codes: absmax_codes.clone().into_primitive(),
            absmax_scales: scales.clone().into_primitive().tensor(),
            code: code.clone().into_primitive().tensor(),
            dynamic: dynamic.clone().into_primitive().tensor(),
            offset,
            shape: [out, inp],
        }),
    ));
    let got = crate::backend::dispatch::nf4_dequantize(
        packed,
        absmax_codes,
        scales,
        code,
        dynamic,
        offset,
        [out, inp],
    );
    let dtype = got.dtype();
    let err = rel_err(&host(got), &host(want));
    // Both round each product to the element type; bf16 may differ by a last bit where burn's
    // fused kernels keep an intermediate in f32.
    let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
    let pass = err <= tol;
    *ok &= pass;
    lines.push(format!(
        "{} nf4 dequantize {dtype:?} [{out}, {inp}]: rel err {err:.2e} (limit {tol:.0e})",
        if pass { "PASS" } else { "FAIL" }
    ));
}

/// 7. The RoPE kernel against burn's ops on the same GPU: forward and gradient, bf16 and f32,
///    a transposed view as input (as the projections give it) and cos/sin shared by the batch
///    or per row.
fn check_rope(lines: &mut Vec<String>, ok: &mut bool) {
    use crate::backend::dispatch::composed_rope;
    use crate::backend::FastOps;
    for dtype in [DType::F32, DType::BF16] {
        for (cos_batch, backward) in [(1usize, false), (3, false), (1, true), (3, true)] {
            let (b, t, h, d) = (3, 37, 5, 64);
            let x = randn::<B, 4>([b, t, h, d], dtype).swap_dims(1, 2);
            let cos = randn::<B, 4>([cos_batch, 1, t, d], dtype);
            let sin = randn::<B, 4>([cos_batch, 1, t, d], dtype);
            let prim = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
            let got = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(B::fast_rope(
                prim(&x),
                prim(&cos),
                prim(&sin),
                backward,
            )));
            let want = composed_rope(x, cos, sin, backward);
            let err = rel_err(&host(got), &host(want));
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            let pass = err <= tol;
            *ok &= pass;
            lines.push(format!(
                "{} rope {dtype:?} cos batch {cos_batch} {}: rel err {err:.2e} (limit {tol:.0e})",
                if pass { "PASS" } else { "FAIL" },
                if backward { "gradient" } else { "forward" }
            ));
        }
    }
}

/// cuDNN's fused attention against the flash kernels on the same inputs (forward, gradients),
/// with queries in the decoder's `[b, t, h, d]` memory order seen as `[b, h, t, d]`.
#[cfg(feature = "cuda")]
fn check_cudnn_attention(lines: &mut Vec<String>, ok: &mut bool) {
    use crate::backend::cuda::cudnn_attention;
    for (b, h, kvh, t, d) in [(2, 14, 2, 1024, 64), (1, 8, 8, 520, 128)] {
        let q = randn::<Ad, 4>([b, t, h, d], DType::BF16)
            .swap_dims(1, 2)
            .require_grad();
        let k = randn::<Ad, 4>([b, kvh, t, d], DType::BF16).require_grad();
        let v = randn::<Ad, 4>([b, kvh, t, d], DType::BF16).require_grad();
        let go = randn::<Ad, 4>([b, t, h, d], DType::BF16);
        let spec = crate::backend::FusedAttentionSpec {
            scale: 1.0 / (d as f64).sqrt(),
            causal: true,
        };
        let run = |cudnn: bool| {
            cudnn_attention::set_enabled(cudnn);
            let o = crate::backend::fused_attention(q.clone(), k.clone(), v.clone(), None, spec);
            let grads = (o.clone().cast(DType::F32) * go.clone().cast(DType::F32))
                .sum()
                .backward();
            let got = [
                host(o.inner()),
                q.grad(&grads).map(host).unwrap_or_default(),
                k.grad(&grads).map(host).unwrap_or_default(),
                v.grad(&grads).map(host).unwrap_or_default(),
            ];
            cudnn_attention::set_enabled(true);
            got
        };
        let (dnn, kernels) = (run(true), run(false));
        for (what, got, want) in ["o", "dq", "dk", "dv"]
            .iter()
            .zip(&dnn)
            .zip(&kernels)
            .map(|((w, g), k)| (w, g, k))
        {
            let err = rel_err(got, want);
            let pass = !got.is_empty() && err <= 1e-2;
            *ok &= pass;
            lines.push(format!(
                "{} cuDNN attention {what} vs flash kernels, b{b} h{h}/{kvh} t{t} d{d} (bf16): rel err {err:.2e}",
                if pass { "PASS" } else { "FAIL" }
            ));
        }
    }
}

fn missing(what: &'static str) -> Error {
    Error::Shape {
        op: "check",
        what: "gradient",
        expected: format!("a gradient for {what}"),
        got: "none".into(),
    }
}
