//! CPU tests of the generic paths (NdArray, with and without Autodiff) against naive loops and
//! against burn's own differentiable ops on the unchunked, unfused formulation.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{activation, Bool, Distribution, Int, Tensor, TensorData, Tolerance};

use crate::backend::attention::{attention, AttentionOptions};
use crate::backend::{
    host_f32, linear, linear_cross_entropy, linear_token_logps, masked_softmax, matmul, matmul_2d,
    matmul_tn,
};

type Cpu = NdArray;
type Ad = Autodiff<NdArray>;

fn rand<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Cpu, D> {
    <Cpu as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Each parameter's gradient in `grads` equals its reference gradient within 1e-5.
fn assert_grads_eq(
    grads: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients,
    params: [&Tensor<Ad, 2>; 2],
    want: [&Tensor<Cpu, 2>; 2],
) {
    for (p, w) in params.into_iter().zip(want) {
        p.grad(grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&w.to_data(), Tolerance::absolute(1e-5));
    }
}

fn assert_close(got: Vec<f32>, want: Vec<f32>, tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn naive_matmul(a: &[f32], b: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    let (ba, bb, m, k, n) = dims;
    let batch = ba.max(bb);
    let mut out = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let (ao, bo) = ((bi % ba) * m * k, (bi % bb) * k * n);
        for i in 0..m {
            for j in 0..n {
                out[(bi * m + i) * n + j] =
                    (0..k).map(|p| a[ao + i * k + p] * b[bo + p * n + j]).sum();
            }
        }
    }
    out
}

#[test]
fn matmul_matches_naive_loops_with_broadcast_and_transposed_views() {
    let a = rand([3, 5, 7], 1);
    let b = rand([1, 7, 4], 2);
    let want = naive_matmul(&values(a.clone()), &values(b.clone()), (3, 1, 5, 7, 4));
    assert_close(
        values(matmul(a.clone(), b.clone())),
        want.clone(),
        1e-5,
        "plain",
    );
    // The same product through transposed views of transposed copies.
    let at = a.swap_dims(1, 2).into_data();
    let bt = b.swap_dims(1, 2).into_data();
    let a2 = Tensor::<Cpu, 3>::from_data(at, &Default::default()).swap_dims(1, 2);
    let b2 = Tensor::<Cpu, 3>::from_data(bt, &Default::default()).swap_dims(1, 2);
    assert_close(values(matmul(a2, b2)), want, 1e-5, "transposed views");
}

#[test]
fn host_copies_equal_into_data_for_shared_transposed_and_sliced_tensors() {
    let w = rand([6, 5], 3);
    let kept = w.clone(); // shared, as a model's weight is
    let cases: Vec<(&str, Tensor<Cpu, 2>)> = vec![
        ("shared", w.clone()),
        ("transposed", w.clone().transpose()),
        ("sliced", w.clone().slice([1..4, 2..5])),
    ];
    for (what, t) in cases {
        let want = values(t.clone());
        assert_eq!(host_f32(t.clone()), want, "{what}");
        let tracked = Tensor::<Ad, 2>::from_inner(t).require_grad();
        assert_eq!(host_f32(tracked), want, "{what} under autodiff");
    }
    let cube = rand([2, 3, 4], 4).swap_dims(0, 2);
    assert_eq!(host_f32(cube.clone()), values(cube), "rank 3, permuted");
    assert_eq!(
        host_f32(kept.clone()),
        values(kept),
        "the original is untouched"
    );
}

#[test]
fn masked_softmax_and_its_gradient_match_the_composed_ops() {
    let s0 = rand([2, 3, 4, 5], 11);
    let w = rand([2, 3, 4, 5], 12);
    // Causal-style mask with a fully masked row, which must come out uniform, not NaN.
    let mut bits = vec![false; 2 * 3 * 4 * 5];
    for (i, bit) in bits.iter_mut().enumerate() {
        let (row, col) = ((i / 5) % 4, i % 5);
        *bit = col > row + 1 || (i / 20 == 4 && row == 2);
    }
    let dev = Default::default();
    for masked in [false, true] {
        let run = |fast: bool| {
            let s = Tensor::<Ad, 4>::from_data(s0.to_data(), &dev).require_grad();
            let mask = masked.then(|| {
                Tensor::<Ad, 4, Bool>::from_data(TensorData::new(bits.clone(), [2, 3, 4, 5]), &dev)
            });
            let p = if fast {
                masked_softmax(s.clone(), mask, 0.37, -1.0e4)
            } else {
                let x = s.clone().mul_scalar(0.37);
                let x = match mask {
                    Some(m) => x.mask_fill(m, -1.0e4),
                    None => x,
                };
                activation::softmax(x, 3)
            };
            let wd = Tensor::<Ad, 4>::from_data(w.to_data(), &dev);
            let grads = (p.clone() * wd).sum().backward();
            (p.into_data(), s.grad(&grads).unwrap().into_data())
        };
        let (p, g) = run(true);
        let (rp, rg) = run(false);
        p.assert_approx_eq::<f32>(&rp, Tolerance::absolute(1e-6));
        g.assert_approx_eq::<f32>(&rg, Tolerance::absolute(1e-6));
        assert!(p.to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn matmul_gradients_match_burns_matmul() {
    let a0 = rand([2, 4, 6], 3);
    let b0 = rand([1, 6, 3], 4);
    let w = rand([2, 4, 3], 5);
    let run = |fast: bool| {
        let a = Tensor::<Ad, 3>::from_data(a0.to_data(), &Default::default()).require_grad();
        let b = Tensor::<Ad, 3>::from_data(b0.to_data(), &Default::default()).require_grad();
        let wd = Tensor::<Ad, 3>::from_data(w.to_data(), &Default::default());
        let c = if fast {
            matmul(a.clone(), b.clone())
        } else {
            a.clone().matmul(b.clone())
        };
        let grads = (c * wd).sum().backward();
        (
            a.grad(&grads).unwrap().into_data(),
            b.grad(&grads).unwrap().into_data(),
        )
    };
    let (ga, gb) = run(true);
    let (ra, rb) = run(false);
    ga.assert_approx_eq::<f32>(&ra, Tolerance::absolute(1e-5));
    gb.assert_approx_eq::<f32>(&rb, Tolerance::absolute(1e-5));
}

#[test]
fn linear_reads_hf_weights_as_out_by_in() {
    let x = rand([6, 4], 6);
    let w = rand([5, 4], 7);
    let want = x.clone().matmul(w.clone().transpose());
    linear(x, w)
        .into_data()
        .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
}

#[test]
fn two_d_products_and_their_gradients_match_burn_for_every_transpose() {
    // linear: x [4, 6] @ w[5, 6]^T; matmul_tn: a[6, 4]^T @ b[6, 5]; matmul_2d: [4, 6] @ [6, 5].
    type Op = fn(Tensor<Ad, 2>, Tensor<Ad, 2>) -> Tensor<Ad, 2>;
    type Case = (&'static str, [usize; 2], [usize; 2], Op, Op);
    let cases: [Case; 3] = [
        ("linear", [4, 6], [5, 6], linear, |a, b| {
            a.matmul(b.transpose())
        }),
        ("matmul_tn", [6, 4], [6, 5], matmul_tn, |a, b| {
            a.transpose().matmul(b)
        }),
        ("matmul_2d", [4, 6], [6, 5], matmul_2d, |a, b| a.matmul(b)),
    ];
    for (i, (name, sa, sb, fast, reference)) in cases.into_iter().enumerate() {
        let a0 = rand(sa, 20 + i as u64);
        let b0 = rand(sb, 30 + i as u64);
        let w = rand([4, 5], 40 + i as u64);
        let run = |op: Op| {
            let a = Tensor::<Ad, 2>::from_data(a0.to_data(), &Default::default()).require_grad();
            let b = Tensor::<Ad, 2>::from_data(b0.to_data(), &Default::default()).require_grad();
            let wd = Tensor::<Ad, 2>::from_data(w.to_data(), &Default::default());
            let c = op(a.clone(), b.clone());
            let value = c.clone().into_data();
            let grads = (c * wd).sum().backward();
            (
                value,
                a.grad(&grads).unwrap().into_data(),
                b.grad(&grads).unwrap().into_data(),
            )
        };
        let (c, ga, gb) = run(fast);
        let (rc, ra, rb) = run(reference);
        assert_eq!(c.shape, rc.shape, "{name}: output shape");
        c.assert_approx_eq::<f32>(&rc, Tolerance::absolute(1e-5));
        ga.assert_approx_eq::<f32>(&ra, Tolerance::absolute(1e-5));
        gb.assert_approx_eq::<f32>(&rb, Tolerance::absolute(1e-5));
    }
    // Few rows against a large row-major weight: the dot-product path (decoding).
    // Rows in fours and weight rows in pairs, with remainders of each; k in lanes of eight,
    // with and without a remainder.
    for (rows, k, n) in [
        (1, 37, 200),
        (3, 37, 200),
        (32, 37, 200),
        (40, 37, 200),
        (5, 64, 201),
    ] {
        let x = rand([rows, k], 60 + rows as u64);
        let w = rand([n, k], 61);
        let want = naive_matmul(
            &values(x.clone()),
            &values(w.clone().transpose()),
            (1, 1, rows, k, n),
        );
        assert_close(values(linear(x, w)), want, 1e-5, "few-row linear");
    }
    // A row's product does not depend on the rows decoded beside it.
    let x = rand([7, 64], 70);
    let w = rand([33, 64], 71);
    let all = values(linear(x.clone(), w.clone()));
    for r in 0..7 {
        let one = values(linear(x.clone().slice([r..r + 1, 0..64]), w.clone()));
        assert_eq!(
            one,
            all[r * 33..(r + 1) * 33],
            "row {r} alone and in a batch of 7"
        );
    }
    // A transposed view as input (the weight of a tied head read as [in, out]).
    let x = rand([3, 6], 50);
    let w = rand([6, 5], 51);
    let wt = Tensor::<Cpu, 2>::from_data(w.clone().transpose().into_data(), &Default::default());
    matmul_2d(x.clone(), wt.transpose())
        .into_data()
        .assert_approx_eq::<f32>(&x.matmul(w).into_data(), Tolerance::absolute(1e-5));
}

/// Loss by the textbook route: all logits, log-softmax, NLL averaged over non-ignored labels.
fn naive_loss(hidden: &[f32], weight: &[f32], labels: &[i64], d: usize, v: usize) -> f32 {
    let (mut total, mut count) = (0.0f64, 0usize);
    for (t, &label) in labels.iter().enumerate() {
        if label == -100 {
            continue;
        }
        let logits: Vec<f64> = (0..v)
            .map(|j| {
                (0..d)
                    .map(|p| (hidden[t * d + p] * weight[j * d + p]) as f64)
                    .sum()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln() + max;
        total += lse - logits[label as usize];
        count += 1;
    }
    (total / count.max(1) as f64) as f32
}

#[test]
fn chunked_cross_entropy_matches_naive_loss_and_full_logits_gradients() {
    let (n, d, v) = (7, 5, 11);
    let h0 = rand([n, d], 8);
    let w0 = rand([v, d], 9);
    let labels_vec: Vec<i64> = vec![3, -100, 10, 0, 5, -100, 7];
    let labels = || {
        Tensor::<Ad, 1, Int>::from_data(
            TensorData::from(labels_vec.as_slice()),
            &Default::default(),
        )
    };
    let want = naive_loss(&values(h0.clone()), &values(w0.clone()), &labels_vec, d, v);

    // Reference gradients: burn's autodiff through the full logits.
    let h = Tensor::<Ad, 2>::from_data(h0.to_data(), &Default::default()).require_grad();
    let w = Tensor::<Ad, 2>::from_data(w0.to_data(), &Default::default()).require_grad();
    let logp = activation::log_softmax(h.clone().matmul(w.clone().transpose()), 1);
    let mask = labels().not_equal_elem(-100);
    let safe = labels().mask_fill(mask.clone().bool_not(), 0);
    let picked = logp.gather(1, safe.unsqueeze_dim(1)).squeeze_dim::<1>(1);
    let reference = -(picked * mask.clone().float()).sum() / mask.float().sum();
    let grads = reference.backward();
    let (rh, rw) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap());

    for chunk in [1, 3, 7, 100] {
        let h = Tensor::<Ad, 2>::from_data(h0.to_data(), &Default::default()).require_grad();
        let w = Tensor::<Ad, 2>::from_data(w0.to_data(), &Default::default()).require_grad();
        let loss = linear_cross_entropy(h.clone(), w.clone(), labels(), chunk);
        let got = loss.clone().into_scalar();
        assert!(
            (got - want).abs() < 1e-4,
            "chunk {chunk}: loss {got} vs {want}"
        );
        assert_grads_eq(&loss.backward(), [&h, &w], [&rh, &rw]);
    }
}

#[test]
fn cross_entropy_with_every_label_ignored_is_zero_not_nan() {
    let h = rand([3, 4], 10);
    let w = rand([6, 4], 11);
    let labels = Tensor::<Cpu, 1, Int>::from_data(TensorData::from([-100i64; 3]), &h.device());
    let loss = linear_cross_entropy(h, w, labels, 2).into_scalar();
    assert_eq!(loss, 0.0);
}

/// `log softmax(h W^T / t)[i, target_i]` by loops in f64 (0 for a negative target).
fn naive_token_logps(
    h: &[f32],
    w: &[f32],
    targets: &[i64],
    d: usize,
    v: usize,
    t: f64,
) -> Vec<f32> {
    targets
        .iter()
        .enumerate()
        .map(|(i, &target)| {
            if target < 0 {
                return 0.0;
            }
            let z: Vec<f64> = (0..v)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|k| f64::from(h[i * d + k]) * f64::from(w[j * d + k]))
                        .sum();
                    dot / t
                })
                .collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = z.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
            (z[target as usize] - lse) as f32
        })
        .collect()
}

#[test]
fn chunked_token_logps_match_loops_and_the_full_logits_gradients() {
    let (n, d, v) = (7, 5, 11);
    let h0 = rand([n, d], 12);
    let w0 = rand([v, d], 13);
    let targets_vec: Vec<i64> = vec![3, -100, 10, 0, 5, 2, 7];
    let targets = || {
        Tensor::<Ad, 1, Int>::from_data(
            TensorData::from(targets_vec.as_slice()),
            &Default::default(),
        )
    };
    // Per-token upstream weights, as GRPO's advantages and mask give them.
    let upstream = [0.5f32, 2.0, -1.0, 0.25, 1.5, -0.75, 1.0];
    for temperature in [1.0, 0.7] {
        let want = naive_token_logps(
            &values(h0.clone()),
            &values(w0.clone()),
            &targets_vec,
            d,
            v,
            temperature,
        );
        // Reference gradients: burn's autodiff through the full logits.
        let h = Tensor::<Ad, 2>::from_data(h0.to_data(), &Default::default()).require_grad();
        let w = Tensor::<Ad, 2>::from_data(w0.to_data(), &Default::default()).require_grad();
        let z = h
            .clone()
            .matmul(w.clone().transpose())
            .div_scalar(temperature);
        let keep = targets().greater_equal_elem(0);
        let safe = targets().mask_fill(keep.clone().bool_not(), 0);
        let picked = activation::log_softmax(z, 1)
            .gather(1, safe.unsqueeze_dim(1))
            .squeeze_dim::<1>(1)
            * keep.float();
        let weights = Tensor::<Ad, 1>::from_floats(upstream, &Default::default());
        let grads = (picked * weights.clone()).sum().backward();
        let (rh, rw) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap());

        for chunk in [1, 3, 7, 100] {
            let h = Tensor::<Ad, 2>::from_data(h0.to_data(), &Default::default()).require_grad();
            let w = Tensor::<Ad, 2>::from_data(w0.to_data(), &Default::default()).require_grad();
            let logps = linear_token_logps(h.clone(), w.clone(), targets(), temperature, chunk);
            let got: Vec<f32> = logps.clone().into_data().convert::<f32>().to_vec().unwrap();
            assert_close(
                got,
                want.clone(),
                1e-5,
                &format!("t {temperature} chunk {chunk}"),
            );
            let grads = (logps * weights.clone()).sum().backward();
            assert_grads_eq(&grads, [&h, &w], [&rh, &rw]);
        }
        // Without autodiff: the same values.
        let plain = linear_token_logps(h0.clone(), w0.clone(), targets().inner(), temperature, 3);
        assert_close(values(plain), want.clone(), 1e-5, "inner backend");
        // The generic formulation in burn's ops (what CUDA runs; the CPU has its own kernel).
        let (logps, lse) = crate::backend::token_logps::forward::<Cpu>(
            h0.clone(),
            w0.clone(),
            targets().inner(),
            temperature,
            3,
        );
        assert_close(values(logps), want, 1e-5, "generic forward");
        let (dh, dw) = crate::backend::token_logps::backward::<Cpu>(
            h0.clone(),
            w0.clone(),
            targets().inner(),
            lse,
            weights.clone().inner(),
            temperature,
            3,
            (true, true),
        );
        dh.unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&rh.to_data(), Tolerance::absolute(1e-5));
        dw.unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&rw.to_data(), Tolerance::absolute(1e-5));
    }
}

/// Attention by nested loops, one query head at a time.
#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, hq, hkv, sq, sk, d): (usize, usize, usize, usize, usize, usize),
    causal: bool,
    padding: &[bool],
) -> Vec<f32> {
    let group = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0; b * hq * sq * d];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..sq {
                let qo = ((bi * hq + h) * sq + i) * d;
                let allowed = |j: usize| {
                    let future = causal && j > sk - sq + i;
                    let padded = padding.get(bi * sk + j).copied().unwrap_or(false);
                    !future && !padded
                };
                let scores: Vec<f32> = (0..sk)
                    .map(|j| {
                        let ko = ((bi * hkv + kh) * sk + j) * d;
                        if allowed(j) {
                            (0..d).map(|p| q[qo + p] * k[ko + p]).sum::<f32>() * scale
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    let vo = ((bi * hkv + kh) * sk + j) * d;
                    for p in 0..d {
                        out[qo + p] += ej / z * v[vo + p];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_loops_for_causal_gqa_padding_and_decode() {
    let (b, hq, hkv, d) = (2, 4, 2, 8);
    for (sq, sk, causal, pad) in [
        (5, 5, true, false),
        (5, 5, false, true),
        (1, 6, true, true),
        (3, 6, true, false),
    ] {
        let q = rand([b, hq, sq, d], 12);
        let k = rand([b, hkv, sk, d], 13);
        let v = rand([b, hkv, sk, d], 14);
        // Pad the last key of the second sequence.
        let padding: Vec<bool> = (0..b * sk).map(|i| pad && i == b * sk - 1).collect();
        let want = naive_attention(
            &values(q.clone()),
            &values(k.clone()),
            &values(v.clone()),
            (b, hq, hkv, sq, sk, d),
            causal,
            &padding,
        );
        let key_padding = pad.then(|| {
            Tensor::<Cpu, 2, Bool>::from_data(
                TensorData::new(padding.clone(), [b, sk]),
                &Default::default(),
            )
        });
        let options = AttentionOptions {
            causal,
            key_padding,
            scale: None,
        };
        let got = attention(q, k, v, options).unwrap();
        assert_close(
            values(got),
            want,
            1e-4,
            &format!("sq {sq} sk {sk} causal {causal} pad {pad}"),
        );
    }
}

#[test]
fn attention_rejects_mismatched_heads_with_a_shape_error() {
    let q = rand([1, 3, 2, 4], 15);
    let k = rand([1, 2, 2, 4], 16);
    let err = attention(q, k.clone(), k, AttentionOptions::default()).unwrap_err();
    assert!(err.to_string().contains("q_heads 3, kv_heads 2"), "{err}");
}

#[test]
fn fused_attention_and_its_autodiff_node_match_composed_attention_and_burns_gradients() {
    // 5 queries at the end of 9 keys (a prefill after a cache), GQA 4/2, batch row 1 left-padded.
    let (b, h, kvh, t, s, d) = (2, 4, 2, 5, 9, 8);
    let dev = Default::default();
    let q0 = rand([b, h, t, d], 11);
    let k0 = rand([b, kvh, s, d], 12);
    let v0 = rand([b, kvh, s, d], 13);
    let go = rand([b, h, t, d], 14);
    let valid: Vec<i64> = (0..b * s)
        .map(|i| i64::from(i / s == 0 || i % s >= 2))
        .collect();
    let valid = Tensor::<Ad, 2, Int>::from_data(TensorData::new(valid, [b, s]), &dev);
    let leaf = |x: &Tensor<Cpu, 4>| Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
    let run = |fused: bool| {
        let (q, k, v) = (leaf(&q0), leaf(&k0), leaf(&v0));
        let out = if fused {
            let spec = crate::backend::FusedAttentionSpec {
                scale: 1.0 / (d as f64).sqrt(),
                causal: true,
            };
            crate::backend::fused_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(valid.clone()),
                spec,
            )
            .swap_dims(1, 2)
        } else {
            let options = AttentionOptions {
                causal: true,
                key_padding: Some(valid.clone().equal_elem(0)),
                scale: None,
            };
            attention(q.clone(), k.clone(), v.clone(), options).unwrap()
        };
        let grads = out
            .clone()
            .mul(Tensor::from_inner(go.clone()))
            .sum()
            .backward();
        let grad = |x: &Tensor<Ad, 4>| values(x.grad(&grads).unwrap());
        (values(out.inner()), grad(&q), grad(&k), grad(&v))
    };
    let (want, fused) = (run(false), run(true));
    assert_close(fused.0, want.0, 1e-5, "output");
    assert_close(fused.1, want.1, 1e-4, "dq");
    assert_close(fused.2, want.2, 1e-4, "dk");
    assert_close(fused.3, want.3, 1e-4, "dv");
}

#[test]
fn fused_attention_gives_zero_to_a_query_that_sees_no_key() {
    // Batch row 0 is all padding: every query there sees nothing, output and gradients are 0.
    let (b, h, t, d) = (2, 2, 3, 4);
    let dev = Default::default();
    let valid =
        Tensor::<Ad, 2, Int>::from_data(TensorData::new(vec![0i64, 0, 0, 1, 1, 1], [b, t]), &dev);
    let q = Tensor::<Ad, 4>::from_inner(rand([b, h, t, d], 21)).require_grad();
    let k = Tensor::<Ad, 4>::from_inner(rand([b, h, t, d], 22)).require_grad();
    let v = Tensor::<Ad, 4>::from_inner(rand([b, h, t, d], 23)).require_grad();
    let spec = crate::backend::FusedAttentionSpec {
        scale: 0.5,
        causal: true,
    };
    let out = crate::backend::fused_attention(q.clone(), k.clone(), v, Some(valid), spec);
    let grads = out.clone().sum().backward();
    let out = values(out.inner());
    assert!(out.iter().all(|x| x.is_finite()));
    assert!(out[..h * t * d].iter().all(|&x| x == 0.0), "{out:?}");
    assert!(out[h * t * d..].iter().any(|&x| x != 0.0));
    let dq = values(q.grad(&grads).unwrap());
    assert!(dq.iter().all(|x| x.is_finite()));
    assert!(dq[..h * t * d].iter().all(|&x| x == 0.0));
}

#[test]
fn swiglu_and_rms_norm_nodes_match_burns_gradients_of_the_composed_ops() {
    let g0 = rand([6, 10], 31);
    let u0 = rand([6, 10], 32);
    let w0 = rand([10], 33);
    let dy = rand([6, 10], 34);
    let leaf2 = |x: &Tensor<Cpu, 2>| Tensor::<Ad, 2>::from_inner(x.clone()).require_grad();
    let leaf1 = |x: &Tensor<Cpu, 1>| Tensor::<Ad, 1>::from_inner(x.clone()).require_grad();
    let loss = |y: Tensor<Ad, 2>| y.mul(Tensor::from_inner(dy.clone())).sum();

    let (g, u) = (leaf2(&g0), leaf2(&u0));
    let grads = loss(crate::backend::swiglu(g.clone(), u.clone())).backward();
    let (gw, uw) = (leaf2(&g0), leaf2(&u0));
    let want = loss(activation::silu(gw.clone()).mul(uw.clone())).backward();
    let grad = |x: &Tensor<Ad, 2>, gr| values(x.grad(gr).unwrap());
    assert_close(grad(&g, &grads), grad(&gw, &want), 1e-5, "swiglu dgate");
    assert_close(grad(&u, &grads), grad(&uw, &want), 1e-5, "swiglu dup");

    let eps = 1e-6;
    let (x, w) = (leaf2(&g0), leaf1(&w0));
    let y = crate::backend::rms_norm(x.clone(), w.clone(), eps);
    let grads = loss(y.clone()).backward();
    let (xw, ww) = (leaf2(&g0), leaf1(&w0));
    let var = xw.clone().powi_scalar(2).mean_dim(1);
    let y_want = xw
        .clone()
        .mul(var.add_scalar(eps).sqrt().recip())
        .mul(ww.clone().unsqueeze::<2>());
    assert_close(
        values(y.inner()),
        values(y_want.clone().inner()),
        1e-6,
        "rms_norm y",
    );
    let want = loss(y_want).backward();
    assert_close(grad(&x, &grads), grad(&xw, &want), 1e-5, "rms_norm dx");
    assert_close(
        values(w.grad(&grads).unwrap().reshape([1, 10])),
        values(ww.grad(&want).unwrap().reshape([1, 10])),
        1e-5,
        "rms_norm dweight",
    );
}

#[test]
fn lora_linear_node_matches_burns_gradients_of_the_composed_ops() {
    let (n, inp, out, r, scale) = (9, 12, 7, 3, 2.5);
    let [x, w, a, b, dy] = [
        rand([n, inp], 41),
        rand([out, inp], 42),
        rand([r, inp], 43),
        rand([out, r], 44),
        rand([n, out], 45),
    ];
    // Every input trainable, then the usual LoRA case (W frozen), then only x (a frozen adapter).
    for trains_w in [true, false] {
        for trains_adapter in [true, false] {
            let leaf = |t: &Tensor<Cpu, 2>, grad: bool| {
                let t = Tensor::<Ad, 2>::from_inner(t.clone());
                if grad {
                    t.require_grad()
                } else {
                    t
                }
            };
            let run = |fused: bool| {
                let (xa, wa) = (leaf(&x, true), leaf(&w, trains_w));
                let (aa, ba) = (leaf(&a, trains_adapter), leaf(&b, trains_adapter));
                let y = if fused {
                    crate::backend::lora_linear(
                        xa.clone(),
                        wa.clone(),
                        aa.clone(),
                        ba.clone(),
                        scale,
                    )
                } else {
                    let low = xa
                        .clone()
                        .matmul(aa.clone().transpose())
                        .matmul(ba.clone().transpose());
                    xa.clone()
                        .matmul(wa.clone().transpose())
                        .add(low.mul_scalar(scale))
                };
                let grads = y
                    .clone()
                    .mul(Tensor::from_inner(dy.clone()))
                    .sum()
                    .backward();
                let grad = |t: &Tensor<Ad, 2>| t.grad(&grads).map(values);
                (
                    values(y.inner()),
                    grad(&xa),
                    grad(&wa),
                    grad(&aa),
                    grad(&ba),
                )
            };
            let (got, want) = (run(true), run(false));
            let case = format!("trains_w {trains_w}, trains_adapter {trains_adapter}");
            assert_close(got.0, want.0, 1e-5, &format!("y ({case})"));
            for (what, g, w) in [
                ("dx", got.1, want.1),
                ("dW", got.2, want.2),
                ("dA", got.3, want.3),
                ("dB", got.4, want.4),
            ] {
                assert_eq!(g.is_some(), w.is_some(), "{what} present ({case})");
                if let (Some(g), Some(w)) = (g, w) {
                    assert_close(g, w, 1e-4, &format!("{what} ({case})"));
                }
            }
        }
    }
}

#[test]
fn swiglu_projection_node_matches_burns_gradients_of_the_composed_ops() {
    let (n, inter, out, r, scale) = (8, 11, 6, 3, 1.5);
    let [g, u, w, a, b, dy] = [
        rand([n, inter], 51),
        rand([n, inter], 52),
        rand([out, inter], 53),
        rand([r, inter], 54),
        rand([out, r], 55),
        rand([n, out], 56),
    ];
    let leaf = |t: &Tensor<Cpu, 2>, grad: bool| {
        let t = Tensor::<Ad, 2>::from_inner(t.clone());
        if grad {
            t.require_grad()
        } else {
            t
        }
    };
    // LoRA (W frozen), full fine-tuning (W trained, no adapter), W alone trained with frozen
    // inputs (a first layer's MLP under prompt methods never is; the node must still be right).
    for (adapter, trains_w, trains_inputs) in [
        (true, false, true),
        (true, true, true),
        (false, true, true),
        (false, false, true),
        (false, true, false),
        (true, false, false),
    ] {
        let run = |fused: bool| {
            let (ga, ua) = (leaf(&g, trains_inputs), leaf(&u, trains_inputs));
            let wa = leaf(&w, trains_w);
            let (aa, ba) = (leaf(&a, adapter), leaf(&b, adapter));
            let y = if fused {
                let lora = adapter.then(|| (aa.clone(), ba.clone()));
                crate::backend::swiglu_linear(ga.clone(), ua.clone(), wa.clone(), lora, scale)
            } else {
                let h = activation::silu(ga.clone()).mul(ua.clone());
                let base = h.clone().matmul(wa.clone().transpose());
                if adapter {
                    let low = h
                        .matmul(aa.clone().transpose())
                        .matmul(ba.clone().transpose());
                    base.add(low.mul_scalar(scale))
                } else {
                    base
                }
            };
            let loss = y.clone().mul(Tensor::from_inner(dy.clone())).sum();
            if !loss.is_require_grad() {
                return (values(y.inner()), vec![None; 5]);
            }
            let grads = loss.backward();
            let grad = |t: &Tensor<Ad, 2>| t.grad(&grads).map(values);
            let all = vec![grad(&ga), grad(&ua), grad(&wa), grad(&aa), grad(&ba)];
            (values(y.inner()), all)
        };
        let (got, want) = (run(true), run(false));
        let case = format!("adapter {adapter}, trains_w {trains_w}, inputs {trains_inputs}");
        assert_close(got.0, want.0, 1e-5, &format!("y ({case})"));
        for (what, (g, w)) in ["dgate", "dup", "dW", "dA", "dB"]
            .iter()
            .zip(got.1.into_iter().zip(want.1))
        {
            assert_eq!(g.is_some(), w.is_some(), "{what} present ({case})");
            if let (Some(g), Some(w)) = (g, w) {
                assert_close(g, w, 1e-4, &format!("{what} ({case})"));
            }
        }
    }
}

#[test]
fn rope_node_matches_burns_gradient_of_rotate_half_with_unequal_halves() {
    // cos and sin with different halves: the node's gradient must not assume HF's duplicated
    // frequencies.
    let x0: Tensor<Cpu, 4> = rand([2 * 3 * 5 * 8], 51)
        .reshape([2, 5, 3, 8])
        .swap_dims(1, 2);
    let cos: Tensor<Cpu, 4> = rand([5 * 8], 52).reshape([1, 1, 5, 8]);
    let sin: Tensor<Cpu, 4> = rand([2 * 5 * 8], 53).reshape([2, 1, 5, 8]);
    let dy: Tensor<Cpu, 4> = rand([2 * 3 * 5 * 8], 54).reshape([2, 3, 5, 8]);
    let loss = |y: Tensor<Ad, 4>| y.mul(Tensor::from_inner(dy.clone())).sum();
    let x = Tensor::<Ad, 4>::from_inner(x0.clone()).require_grad();
    let (c, s) = (
        Tensor::from_inner(cos.clone()),
        Tensor::from_inner(sin.clone()),
    );
    let y = crate::backend::rope(x.clone(), c.clone(), s.clone());
    let grads = loss(y.clone()).backward();

    let xw = Tensor::<Ad, 4>::from_inner(x0).require_grad();
    let [b, h, t, d] = xw.dims();
    let x1 = xw.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = xw.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let y_want = xw
        .clone()
        .mul(c)
        .add(Tensor::cat(vec![x2.neg(), x1], 3).mul(s));
    let flat = |t: Tensor<Cpu, 4>| values(t.reshape([1, 2 * 3 * 5 * 8]));
    assert_close(
        flat(y.inner()),
        flat(y_want.clone().inner()),
        1e-6,
        "rope y",
    );
    let want = loss(y_want).backward();
    assert_close(
        flat(x.grad(&grads).unwrap()),
        flat(xw.grad(&want).unwrap()),
        1e-5,
        "rope dx",
    );
}
