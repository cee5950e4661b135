//! ggml block (de)quantization on host f32 data, bit-identical to ggml's reference code:
//! `quantize_row_*_ref` / `dequantize_row_*` in llama.cpp ggml/src/ggml-quants.c (f32 arithmetic
//! in the same order, no fused multiply-add), fp16 by round-to-nearest-even as
//! `ggml_compute_fp32_to_fp16`, bf16 as `ggml_compute_fp32_to_bf16` (ggml-impl.h).

use half::f16;

use crate::gguf::{Error, GgmlType, Result, QK_K};

const GROUP_MAX_EPS: f32 = 1e-15;

fn fp16(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn put_fp16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Round to the f16 grid and back, as ggml does when it reads a stored block scale.
fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml-impl.h `ggml_compute_fp32_to_bf16`: quiet NaNs, round to nearest even.
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1)) as u64) >> 16) as u16
}

/// ggml-quants.c `nearest_int`: round half to even through the 1.5·2^23 trick.
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12582912.0f32;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// Whether `ty` can be produced by [`quantize`].
pub fn can_quantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q6_K
    )
}

/// Whether `ty` can be read by [`dequantize`].
pub fn can_dequantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K | Q8_K
    )
}

/// Bytes taken by `n` elements of `ty`, or None when `n` is not a whole number of blocks (or the
/// size overflows).
pub fn byte_size(ty: GgmlType, n: usize) -> Option<usize> {
    let (bs, ts) = ty.block()?;
    if !n.is_multiple_of(bs) {
        return None;
    }
    (n / bs).checked_mul(ts)
}

/// Dequantizes `n` elements stored as `ty` in `bytes` (ggml `dequantize_row_*`).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let err = |what: String| Error::Quant {
        ty: ty.name(),
        what,
    };
    let need = byte_size(ty, n)
        .ok_or_else(|| err(format!("{n} elements is not a whole number of blocks")))?;
    if bytes.len() < need {
        return Err(err(format!(
            "need {need} bytes for {n} elements, got {}",
            bytes.len()
        )));
    }
    let bytes = &bytes[..need];
    let mut y = Vec::with_capacity(n);
    use GgmlType::*;
    match ty {
        F32 => y.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        F16 => y.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        BF16 => y.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)),
        ),
        Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = fp16(b, 0);
                y.extend(b[2..].iter().map(|&q| (q as i8) as f32 * d));
            }
        }
        Q4_0 | Q4_1 => {
            let with_min = ty == Q4_1;
            let (bs, qs_at) = if with_min { (20, 4) } else { (18, 2) };
            for b in bytes.chunks_exact(bs) {
                let d = fp16(b, 0);
                let qs = &b[qs_at..];
                let mut block = [0f32; 32];
                for j in 0..16 {
                    let (lo, hi) = ((qs[j] & 0x0f) as i32, (qs[j] >> 4) as i32);
                    if with_min {
                        let m = fp16(b, 2);
                        block[j] = lo as f32 * d + m;
                        block[j + 16] = hi as f32 * d + m;
                    } else {
                        block[j] = (lo - 8) as f32 * d;
                        block[j + 16] = (hi - 8) as f32 * d;
                    }
                }
                y.extend_from_slice(&block);
            }
        }
        Q5_0 | Q5_1 => {
            let with_min = ty == Q5_1;
            let (bs, qh_at) = if with_min { (24, 4) } else { (22, 2) };
            for b in bytes.chunks_exact(bs) {
                let d = fp16(b, 0);
                let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
                let qs = &b[qh_at + 4..];
                let mut block = [0f32; 32];
                for j in 0..16 {
                    let xh0 = (((qh >> j) << 4) & 0x10) as i32;
                    let xh1 = ((qh >> (j + 12)) & 0x10) as i32;
                    let x0 = (qs[j] & 0x0f) as i32 | xh0;
                    let x1 = (qs[j] >> 4) as i32 | xh1;
                    if with_min {
                        let m = fp16(b, 2);
                        block[j] = x0 as f32 * d + m;
                        block[j + 16] = x1 as f32 * d + m;
                    } else {
                        block[j] = (x0 - 16) as f32 * d;
                        block[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
                y.extend_from_slice(&block);
            }
        }
        Q4_K | Q5_K => {
            let five = ty == Q5_K;
            let bs = if five { 176 } else { 144 };
            for b in bytes.chunks_exact(bs) {
                let d = fp16(b, 0);
                let min = fp16(b, 2);
                let scales = &b[4..16];
                let (qh, mut ql) = if five {
                    (&b[16..48], &b[48..])
                } else {
                    (&b[0..0], &b[16..])
                };
                let (mut u1, mut u2) = (1u8, 2u8);
                for is in (0..8).step_by(2) {
                    let (sc, m) = scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, min * m as f32);
                    let (sc, m) = scale_min_k4(is + 1, scales);
                    let (d2, m2) = (d * sc as f32, min * m as f32);
                    for l in 0..32 {
                        let h = if five && qh[l] & u1 != 0 { 16 } else { 0 };
                        y.push(d1 * ((ql[l] & 0xf) as i32 + h) as f32 - m1);
                    }
                    for l in 0..32 {
                        let h = if five && qh[l] & u2 != 0 { 16 } else { 0 };
                        y.push(d2 * ((ql[l] >> 4) as i32 + h) as f32 - m2);
                    }
                    ql = &ql[32..];
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
        }
        Q6_K => {
            for b in bytes.chunks_exact(210) {
                let d = fp16(b, 208);
                let mut out = [0f32; QK_K];
                for half_idx in 0..2 {
                    let ql = &b[half_idx * 64..];
                    let qh = &b[128 + half_idx * 32..];
                    let sc = &b[192 + half_idx * 8..];
                    let yo = &mut out[half_idx * 128..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
                y.extend_from_slice(&out);
            }
        }
        Q8_K => {
            for b in bytes.chunks_exact(292) {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                y.extend(b[4..4 + QK_K].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        other => return Err(err(format!("dequantization of {other} is not implemented"))),
    }
    Ok(y)
}

/// ggml-quants.c `get_scale_min_k4`: 6-bit scale and min `j` of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Quantizes `x` (a whole number of blocks, rows laid end to end) to `ty` with ggml's reference
/// quantizers; rows are split over threads, which does not change the bytes.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let err = |what: String| Error::Quant {
        ty: ty.name(),
        what,
    };
    if !can_quantize(ty) {
        return Err(err("quantization to this type is not implemented".into()));
    }
    let (bs, ts) = ty.block().ok_or_else(|| err("unknown block size".into()))?;
    if !x.len().is_multiple_of(bs) {
        return Err(err(format!(
            "{} elements is not a multiple of the block size {bs}",
            x.len()
        )));
    }
    let n_blocks = x.len() / bs;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let per_thread = n_blocks.div_ceil(threads).max(4096 / bs.max(1) + 1);
    let chunks: Vec<&[f32]> = x.chunks(per_thread * bs).collect();
    if chunks.len() <= 1 {
        return Ok(quantize_blocks(ty, x));
    }
    let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|c| s.spawn(move || quantize_blocks(ty, c)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let out: Vec<u8> = parts.concat();
    if out.len() != n_blocks * ts {
        return Err(err("a quantization thread failed".into()));
    }
    Ok(out)
}

fn quantize_blocks(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    use GgmlType::*;
    let mut out = Vec::with_capacity(byte_size(ty, x.len()).unwrap_or(0));
    match ty {
        F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        F16 => x.iter().for_each(|&v| put_fp16(&mut out, v)),
        BF16 => x
            .iter()
            .for_each(|&v| out.extend_from_slice(&f32_to_bf16_bits(v).to_le_bytes())),
        Q8_0 => x.chunks_exact(32).for_each(|b| q8_0_block(b, &mut out)),
        Q4_0 => x.chunks_exact(32).for_each(|b| q4_0_block(b, &mut out)),
        Q4_1 => x.chunks_exact(32).for_each(|b| q4_1_block(b, &mut out)),
        Q5_0 => x.chunks_exact(32).for_each(|b| q5_0_block(b, &mut out)),
        Q5_1 => x.chunks_exact(32).for_each(|b| q5_1_block(b, &mut out)),
        Q4_K => x.chunks_exact(QK_K).for_each(|b| q4_k_block(b, &mut out)),
        Q6_K => x.chunks_exact(QK_K).for_each(|b| q6_k_block(b, &mut out)),
        _ => {}
    }
    out
}

fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_fp16(out, d);
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// The value of largest magnitude, first one on ties (as the `amax < fabsf(v)` scan).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_fp16(out, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

fn q4_1_block(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_fp16(out, d);
    put_fp16(out, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        out.push(q0 | (q1 << 4));
    }
}

fn push_q5(q: &[u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for j in 0..16 {
        qh |= (((q[j] & 0x10) >> 4) as u32) << j;
        qh |= (((q[j + 16] & 0x10) >> 4) as u32) << (j + 16);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}

fn q5_0_block(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_fp16(out, d);
    let mut q = [0u8; 32];
    for (qj, &v) in q.iter_mut().zip(x) {
        *qj = ((v * id + 16.5) as i8).min(31) as u8;
    }
    push_q5(&q, out);
}

fn q5_1_block(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_fp16(out, d);
    put_fp16(out, min);
    let mut q = [0u8; 32];
    for (qj, &v) in q.iter_mut().zip(x) {
        *qj = ((v - min) * id + 0.5) as u8;
    }
    push_q5(&q, out);
}

/// ggml-quants.c `make_qkx2_quants` (weighted asymmetric scale/min search); returns (scale, -min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = l.clamp(0, nmax) as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32], -1.0, 0.1, 20);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    put_fp16(out, max_scale / 63.0);
    put_fp16(out, max_min / 63.0);
    out.extend_from_slice(&sc);
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let dj = d * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
    }
}

/// ggml-quants.c `make_qx_quants` with rmse_type 1 and no importance weights (Q6_K's use).
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, l_out: &mut [i8]| {
        for (lo, &v) in l_out.iter_mut().zip(x) {
            *lo = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
        }
    };
    let iscale = -nmaxf / max;
    fill(iscale, l_out);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, l_out);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend(std::iter::repeat_n(0u8, 208));
        put_fp16(out, 0.0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16_round(1.0 / iscale);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let dj = d * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (half_idx, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[half_idx * 64..], &mut qh[half_idx * 32..]);
        for i in 0..32 {
            let q = |o: usize| l[j + i + o] as u8;
            ql[i] = (q(0) & 0xf) | ((q(64) & 0xf) << 4);
            ql[i + 32] = (q(32) & 0xf) | ((q(96) & 0xf) << 4);
            qh[i] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    put_fp16(out, 1.0 / iscale);
}
