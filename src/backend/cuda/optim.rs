//! The optimizer kernels (`optim.cu`) on burn-cuda tensors: AdamW over many parameters and the
//! sum of squares of many gradients, a few launches for all tensors of a step in place of one
//! or more per tensor (see `crate::backend::adamw`).

use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor};
use cubecl::cuda::CudaRuntime;
use cudarc::driver::sys as drv_sys;

use crate::backend::adamw::{AdamwTensors, AdamwUpdated};
use crate::backend::cuda::nvrtc::{self, Args};
use crate::backend::Error;

type CT = CubeTensor<CudaRuntime>;

const SOURCE: &str = include_str!("optim.cu");
const THREADS: u32 = 256;
/// Tensors per launch: the table of one launch must stay under CUDA's 4 KB of kernel
/// parameters (88 bytes a tensor, see `AdamwTable` in optim.cu).
const GROUP: usize = 40;
/// Elements per block (8 per thread).
const CHUNK: usize = 2048;

/// The kernels, in [`NAMES`] order.
const NAMES: [&str; 5] = [
    "runner_adamw_many_grad_bf16",
    "runner_adamw_many_grad_f32",
    "runner_squares_many_bf16",
    "runner_squares_many_f32",
    "runner_sum_partials",
];

struct Kernels {
    /// Indexed by `grad_is_f32`.
    adamw: [drv_sys::CUfunction; 2],
    squares: [drv_sys::CUfunction; 2],
    sum_partials: drv_sys::CUfunction,
}

fn with_kernels<T>(ordinal: usize, f: impl FnOnce(&Kernels) -> T) -> Result<T, Error> {
    let defines = [format!("-DGROUP={GROUP}"), format!("-DCHUNK={CHUNK}")];
    let k = nvrtc::kernels(ordinal, SOURCE, "optim.cu", &defines, &NAMES)?.0;
    Ok(f(&Kernels {
        adamw: [k[0], k[1]],
        squares: [k[2], k[3]],
        sum_partials: k[4],
    }))
}

/// Whether the kernels load on device `ordinal` (compiled on the first call); checked before
/// anything is queued, so a failure falls back to burn's operations.
pub fn kernels_ready(ordinal: usize) -> Result<(), Error> {
    with_kernels(ordinal, |_| ())
}

/// Whether the AdamW kernel takes these types: f32 weights, moments and scale, a bf16 or f32
/// gradient, and no low copy or a bf16 one.
pub fn supported(
    weights: DType,
    moments: [DType; 2],
    grad: DType,
    scale: Option<DType>,
    low: Option<FloatDType>,
) -> bool {
    weights == DType::F32
        && moments == [DType::F32; 2]
        && matches!(grad, DType::BF16 | DType::F32)
        && matches!(scale, None | Some(DType::F32))
        && matches!(low, None | Some(FloatDType::BF16))
}

/// Whether the sum-of-squares kernel reads this type.
pub fn squares_supported(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F32)
}

/// A new contiguous tensor of `shape` and `dtype` on `like`'s device.
fn empty(like: &CT, shape: &Shape, dtype: DType) -> CT {
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape.clone(),
        handle,
        dtype,
    )
}

/// Where the kernel writes the update of contiguous `t`: `t`'s own memory when nothing else
/// holds it, else a new f32 tensor; either way in `shape` (moments loaded flat from a
/// checkpoint take their weights' shape).
fn output_for(t: &CT, shape: &Shape) -> CT {
    if t.can_mut() {
        CubeTensor::new_contiguous(
            t.client.clone(),
            t.device.clone(),
            shape.clone(),
            t.handle.clone(),
            t.dtype,
        )
    } else {
        empty(t, shape, DType::F32)
    }
}

/// A C struct's bytes, written field array by field array at the offsets the device computes.
struct Table(Vec<u8>);

impl Table {
    fn new(size: usize) -> Self {
        Self(vec![0; size])
    }
    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.0[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

/// Blocks of each tensor and the running start of each (`first_block`, GROUP + 1 entries).
fn block_starts(lengths: &[usize]) -> (Vec<i32>, usize) {
    let mut starts = Vec::with_capacity(GROUP + 1);
    let mut total = 0usize;
    for &n in lengths {
        starts.push(total as i32);
        total += n.div_ceil(CHUNK);
    }
    starts.resize(GROUP + 1, total as i32);
    (starts, total)
}

fn ints(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// AdamW on the tensors of `params` (see [`supported`] for the types; all with one gradient
/// type, betas and eps; any shapes of equal element counts), a launch per [`GROUP`] tensors.
/// Weights and moments are updated in place where nothing else holds them; outputs take the
/// weights' shape. `Err` when the kernels cannot load here
/// (nothing queued; the caller computes the composed update).
pub fn adamw_many(
    params: Vec<AdamwTensors<CT>>,
    grad_scale: Option<CT>,
) -> Result<Vec<AdamwUpdated<CT>>, Error> {
    let Some(first) = params.first() else {
        return Ok(Vec::new());
    };
    let ordinal = first.weights.device.index;
    let grad_f32 = first.grad.dtype == DType::F32;
    let hp0 = first.hp;
    for p in &params {
        let n = p.weights.meta.shape().num_elements();
        for (what, t) in [
            ("grad", &p.grad),
            ("exp_avg", &p.exp_avg),
            ("exp_avg_sq", &p.exp_avg_sq),
        ] {
            let len = t.meta.shape().num_elements();
            if len != n {
                return Err(Error::Shape {
                    op: "adamw",
                    what,
                    expected: format!("{n} elements, as the weights"),
                    got: len.to_string(),
                });
            }
        }
        let same_kernel = (p.grad.dtype == DType::F32) == grad_f32
            && (p.hp.beta1, p.hp.beta2, p.hp.eps) == (hp0.beta1, hp0.beta2, hp0.eps);
        if !same_kernel {
            return Err(Error::Shape {
                op: "adamw",
                what: "group",
                expected: "one gradient type, beta1, beta2 and eps for every tensor".into(),
                got: format!("{:?} and {:?}", first.grad.dtype, p.grad.dtype),
            });
        }
    }
    let function = with_kernels(ordinal, |k| k.adamw[usize::from(grad_f32)])?;
    let grad_scale = grad_scale.map(into_contiguous);
    let scalar = |x: f64| x as f32;
    let (beta1, one_minus_beta1) = (scalar(hp0.beta1), scalar(1.0 - hp0.beta1));
    let (beta2, one_minus_beta2) = (scalar(hp0.beta2), scalar(1.0 - hp0.beta2));
    let eps = scalar(hp0.eps);

    let mut results = Vec::with_capacity(params.len());
    let mut params = params.into_iter().peekable();
    while params.peek().is_some() {
        let group: Vec<AdamwTensors<CT>> = params.by_ref().take(GROUP).collect();
        let lengths: Vec<usize> = group
            .iter()
            .map(|p| p.weights.meta.shape().num_elements())
            .collect();
        let (starts, blocks) = block_starts(&lengths);
        // Table layout (optim.cu `AdamwTable`): eight pointer arrays, n, three float arrays,
        // first_block.
        let g = GROUP;
        let mut table = Table::new((84 * g + 4 * (g + 1)).next_multiple_of(8));
        let mut handles = Vec::with_capacity(group.len() * 8 + 1);
        // Per tensor: which handle index holds each of the 8 pointers (None = null).
        let mut slots: Vec<[Option<usize>; 8]> = Vec::with_capacity(group.len());
        for (i, p) in group.into_iter().enumerate() {
            let n = lengths[i];
            let [w, grad, m, v] = [p.weights, p.grad, p.exp_avg, p.exp_avg_sq].map(into_contiguous);
            let shape = w.meta.shape().clone();
            let w_out = output_for(&w, &shape);
            let m_out = output_for(&m, &shape);
            let v_out = output_for(&v, &shape);
            let low_out = p.low.map(|_| empty(&w, &shape, DType::BF16));
            let hp = p.hp;
            let decay = scalar(1.0 - hp.lr * hp.weight_decay);
            let step_size = scalar(hp.lr / hp.bias_correction1());
            let sqrt_bc2 = scalar(hp.bias_correction2().sqrt());
            table.put(64 * g + 8 * i, &(n as i64).to_le_bytes());
            table.put(72 * g + 4 * i, &decay.to_le_bytes());
            table.put(76 * g + 4 * i, &step_size.to_le_bytes());
            table.put(80 * g + 4 * i, &sqrt_bc2.to_le_bytes());
            let mut slot = [None; 8];
            for (k, t) in [
                Some(&w),
                Some(&grad),
                Some(&m),
                Some(&v),
                Some(&w_out),
                low_out.as_ref(),
                Some(&m_out),
                Some(&v_out),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(t) = t {
                    slot[k] = Some(handles.len());
                    handles.push(t.handle.clone());
                }
            }
            slots.push(slot);
            results.push(AdamwUpdated {
                weights: w_out,
                exp_avg: m_out,
                exp_avg_sq: v_out,
                low: low_out,
            });
        }
        table.put(84 * g, &ints(&starts));
        let count = slots.len() as i32;
        let scale_index = grad_scale.as_ref().map(|s| {
            handles.push(s.handle.clone());
            handles.len() - 1
        });
        // The queue runs on the last handle's stream: an output of this launch.
        let last = results.last().expect("a non-empty group");
        handles.push(last.exp_avg_sq.handle.clone());
        nvrtc::launch(
            ordinal,
            &last.exp_avg_sq.client,
            handles,
            "AdamW",
            function,
            ((blocks.max(1) as u32, 1, 1), THREADS, 0),
            move |p| {
                let mut table = table;
                for (i, slot) in slots.iter().enumerate() {
                    for (k, index) in slot.iter().enumerate() {
                        let ptr = index.map_or(0, |j| p[j]);
                        table.put(8 * (k * GROUP + i), &ptr.to_le_bytes());
                    }
                }
                let mut a = Args::default();
                a.bytes(&table.0)
                    .i32(count)
                    .ptr(scale_index.map_or(0, |j| p[j]));
                for x in [beta1, one_minus_beta1, beta2, one_minus_beta2, eps] {
                    a.f32(x);
                }
                a
            },
        );
    }
    Ok(results)
}

/// The sum of squares of every element of `tensors` (any shapes; bf16 or f32, see
/// [`squares_supported`]) as a `[1]` f32 tensor: per-block partial sums, then one block adds
/// them in order, so equal gradients give an equal norm on every run. `Err` when the kernels
/// cannot load here or a type is not read (nothing queued).
pub fn sum_squares(tensors: Vec<CT>) -> Result<CT, Error> {
    let Some(first) = tensors.first() else {
        return Err(Error::Shape {
            op: "sum_squares",
            what: "tensors",
            expected: "at least one".into(),
            got: "none".into(),
        });
    };
    if let Some(t) = tensors.iter().find(|t| !squares_supported(t.dtype)) {
        return Err(Error::Shape {
            op: "sum_squares",
            what: "dtype",
            expected: "bf16 or f32".into(),
            got: format!("{:?}", t.dtype),
        });
    }
    let ordinal = first.device.index;
    let (squares, sum_partials) = with_kernels(ordinal, |k| (k.squares, k.sum_partials))?;
    let tensors: Vec<CT> = tensors
        .into_iter()
        .map(into_contiguous)
        .filter(|t| t.meta.shape().num_elements() > 0)
        .collect();
    // Launch groups: up to GROUP tensors of one type each.
    let mut groups: Vec<Vec<CT>> = Vec::new();
    for t in tensors {
        match groups.last_mut() {
            Some(g) if g.len() < GROUP && g[0].dtype == t.dtype => g.push(t),
            _ => groups.push(vec![t]),
        }
    }
    let group_blocks: Vec<usize> = groups
        .iter()
        .map(|g| {
            g.iter()
                .map(|t| t.meta.shape().num_elements().div_ceil(CHUNK))
                .sum()
        })
        .collect();
    let total_blocks: usize = group_blocks.iter().sum();
    let anchor = groups.first().map(|g| g[0].clone());
    let partial = match &anchor {
        Some(t) => empty(t, &Shape::new([total_blocks.max(1)]), DType::F32),
        None => {
            return Err(Error::Shape {
                op: "sum_squares",
                what: "tensors",
                expected: "at least one element".into(),
                got: "only empty tensors".into(),
            })
        }
    };
    let mut partial0 = 0usize;
    for (group, blocks) in groups.into_iter().zip(group_blocks) {
        let lengths: Vec<usize> = group
            .iter()
            .map(|t| t.meta.shape().num_elements())
            .collect();
        let (starts, _) = block_starts(&lengths);
        let g = GROUP;
        // Table layout (optim.cu `SquaresTable`): pointers, n, first_block.
        let mut table = Table::new((16 * g + 4 * (g + 1)).next_multiple_of(8));
        for (i, &n) in lengths.iter().enumerate() {
            table.put(8 * g + 8 * i, &(n as i64).to_le_bytes());
        }
        table.put(16 * g, &ints(&starts));
        let function = squares[usize::from(group[0].dtype == DType::F32)];
        let count = group.len() as i32;
        let mut handles: Vec<_> = group.iter().map(|t| t.handle.clone()).collect();
        handles.push(partial.handle.clone());
        let first_partial = partial0 as i32;
        nvrtc::launch(
            ordinal,
            &partial.client,
            handles,
            "sum of squares",
            function,
            ((blocks as u32, 1, 1), THREADS, 0),
            move |p| {
                let mut table = table;
                for (i, ptr) in p[..count as usize].iter().enumerate() {
                    table.put(8 * i, &ptr.to_le_bytes());
                }
                let mut a = Args::default();
                a.bytes(&table.0)
                    .i32(count)
                    .ptr(p[count as usize])
                    .i32(first_partial);
                a
            },
        );
        partial0 += blocks;
    }
    let out = empty(&partial, &Shape::new([1]), DType::F32);
    let n_partials = total_blocks as i32;
    nvrtc::launch(
        ordinal,
        &partial.client,
        vec![partial.handle.clone(), out.handle.clone()],
        "sum of squares",
        sum_partials,
        ((1, 1, 1), THREADS, 0),
        move |p| {
            let mut a = Args::default();
            a.ptr(p[0]).i32(n_partials).ptr(p[1]);
            a
        },
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_the_kernel_parameter_limit() {
        // AdamwTable plus count, scale and five floats; SquaresTable plus its three scalars.
        let adamw = (84 * GROUP + 4 * (GROUP + 1)).next_multiple_of(8) + 8 + 8 + 5 * 8;
        assert!(adamw <= 4096, "{adamw} bytes");
    }

    #[test]
    fn block_starts_cover_every_chunk() {
        let (starts, total) = block_starts(&[1, CHUNK, CHUNK + 1]);
        assert_eq!(&starts[..4], &[0, 1, 2, 4]);
        assert_eq!(total, 4);
        assert!(starts[3..].iter().all(|&s| s == 4));
    }
}
