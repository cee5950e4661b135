//! Causal attention through cuDNN's fused SDPA engines (on Hopper, the wgmma kernels PyTorch's
//! `scaled_dot_product_attention` runs), built with cuDNN's backend graph API. cudarc loads
//! libcudnn at run time; where it is missing, or no engine takes the graph, the flash kernels of
//! `flash_attention.cu` run instead.
//!
//! The graphs are the ones cudnn-frontend 1.18 lowers its SDPA nodes to ("composite"
//! implementation): the engines recognise that pattern of matmul, pointwise and reduction
//! operations, not a dedicated operation. The forward keeps the log-sum-exp of each query row
//! (cuDNN's `Stats`, the same numbers as the flash kernels' `lse`), so either backward can follow
//! either forward. Here: bf16, causal with queries and keys the same length (training and
//! prefill), no padding mask; everything else goes to the flash kernels.
//!
//! Reference: cuDNN backend API (docs.nvidia.com/deeplearning/cudnn/backend), cudnn-frontend's
//! `sdpa` and `sdpa_backward` nodes; the graphs below were read from cuDNN's API log of PyTorch's
//! SDPA on the H100 (`scripts/cudnn_sdpa_graphs.py` prints them).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{DType, Tensor};
use burn_cubecl::{
    element::BoolElement, tensor::CubeTensor, CubeBackend, FloatElement, IntElement,
};
use cubecl::cuda::CudaRuntime;
use cudarc::cudnn::sys as dnn;
use dnn::cudnnBackendAttributeName_t as A;
use dnn::cudnnBackendAttributeType_t as Ty;
use dnn::cudnnBackendDescriptorType_t as D;

use crate::backend::cuda::flash::empty;
use crate::backend::Error;

type CT = CubeTensor<CudaRuntime>;
type Cube<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

/// Shapes of one attention call: `q [b, h, t, d]`, `k`, `v [b, kvh, s, d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub k_len: usize,
    pub head_dim: usize,
}

/// Element strides of a `[b, h, t, d]` view (the last is 1).
type Strides = [i64; 4];

fn strides(t: &CT) -> Strides {
    let s = t.meta.strides();
    [s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64]
}

/// Strides of a `[b, t, h, d]` tensor seen as `[b, h, t, d]`.
fn strides_bthd(t: &CT) -> Strides {
    let s = strides(t);
    [s[0], s[2], s[1], s[3]]
}

/// Turned off by `RUNNER_CUDNN_ATTENTION=0` (read once) or by `set_enabled(false)`.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Lets the GPU checks compare this path with the flash kernels in one process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn enabled() -> bool {
    static OFF_BY_ENV: OnceLock<bool> = OnceLock::new();
    let off = *OFF_BY_ENV
        .get_or_init(|| std::env::var("RUNNER_CUDNN_ATTENTION").is_ok_and(|v| v.trim() == "0"));
    !off && ENABLED.load(Ordering::Relaxed)
}

/// Whether the graphs below describe the call: causal over equal lengths (the mask is
/// cuDNN's top-left diagonal), no padding mask, head dim 64 or 128.
fn graph_covers(shape: &Shape, causal: bool, has_mask: bool) -> bool {
    causal && !has_mask && shape.q_len == shape.k_len && matches!(shape.head_dim, 64 | 128)
}

/// Whether this path takes the call (the flash kernels take the rest).
pub fn applies(shape: &Shape, causal: bool, has_mask: bool) -> bool {
    graph_covers(shape, causal, has_mask) && enabled() && library_present()
}

/// Whether libcudnn loads here, asked once: cudarc's check opens and closes the library (or
/// searches for it in vain) on every call.
fn library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only asks the loader whether libcudnn is there.
    *PRESENT.get_or_init(|| unsafe { dnn::is_culib_present() })
}

fn dnn_err(call: &'static str, status: dnn::cudnnStatus_t) -> Error {
    let mut msg = vec![0 as std::ffi::c_char; 512];
    // SAFETY: the buffer holds `max_size` bytes; cuDNN writes a NUL-terminated string.
    let last = unsafe {
        dnn::cudnnGetLastErrorString(msg.as_mut_ptr(), msg.len());
        std::ffi::CStr::from_ptr(msg.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    Error::Cuda {
        call,
        detail: format!("{status:?} {last}"),
    }
}

fn check(call: &'static str, status: dnn::cudnnStatus_t) -> Result<(), Error> {
    if status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(dnn_err(call, status))
    }
}

/// One backend descriptor, destroyed with its owner.
struct Desc(dnn::cudnnBackendDescriptor_t);

// SAFETY: descriptors are plain host objects; they are used under the state's mutex.
unsafe impl Send for Desc {}
unsafe impl Sync for Desc {}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnBackendCreateDescriptor, destroyed once.
        unsafe { dnn::cudnnBackendDestroyDescriptor(self.0) };
    }
}

impl Desc {
    fn new(kind: D) -> Result<Self, Error> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: out-pointer to a descriptor handle.
        check("cudnnBackendCreateDescriptor", unsafe {
            dnn::cudnnBackendCreateDescriptor(kind, &mut raw)
        })?;
        Ok(Self(raw))
    }

    fn set<T>(&self, name: A, ty: Ty, values: &[T]) -> Result<&Self, Error> {
        // SAFETY: `values` holds `len` elements of the type `ty` names (the callers pair them).
        check("cudnnBackendSetAttribute", unsafe {
            dnn::cudnnBackendSetAttribute(
                self.0,
                name,
                ty,
                values.len() as i64,
                values.as_ptr() as *const c_void,
            )
        })
        .map_err(|e| match e {
            Error::Cuda { detail, .. } => Error::Cuda {
                call: "cudnnBackendSetAttribute",
                detail: format!("{name:?}: {detail}"),
            },
            other => other,
        })?;
        Ok(self)
    }

    fn desc(&self, name: A, value: &Desc) -> Result<&Self, Error> {
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[value.0])
    }

    fn finalize(self) -> Result<Self, Error> {
        // SAFETY: a descriptor whose required attributes were set above.
        check("cudnnBackendFinalize", unsafe {
            dnn::cudnnBackendFinalize(self.0)
        })?;
        Ok(self)
    }
}

/// A finalized operation of `kind` whose attributes are the descriptors given.
fn operation(kind: D, inputs: &[(A, &Desc)]) -> Result<Desc, Error> {
    let op = Desc::new(kind)?;
    for (name, value) in inputs {
        op.desc(*name, value)?;
    }
    op.finalize()
}

#[derive(Clone, Copy)]
enum Elem {
    Bf16,
    F32,
    I32,
    Bool,
}

impl Elem {
    fn cudnn(self) -> dnn::cudnnDataType_t {
        use dnn::cudnnDataType_t::*;
        match self {
            Self::Bf16 => CUDNN_DATA_BFLOAT16,
            Self::F32 => CUDNN_DATA_FLOAT,
            Self::I32 => CUDNN_DATA_INT32,
            Self::Bool => CUDNN_DATA_BOOLEAN,
        }
    }
}

/// How a graph tensor is backed: device memory the caller passes (`Io`), intermediate values
/// the engine keeps on chip (`Virtual`), or a host scalar passed at execution (`Scalar`).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Io,
    Virtual,
    Scalar,
}

/// An operation graph under construction: tensors by unique id, then operations over them.
#[derive(Default)]
struct Graph {
    tensors: HashMap<i64, Desc>,
    ops: Vec<Desc>,
}

impl Graph {
    fn tensor(
        &mut self,
        uid: i64,
        elem: Elem,
        dims: [i64; 4],
        strides: Strides,
        kind: Kind,
    ) -> Result<(), Error> {
        let t = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        t.set(
            A::CUDNN_ATTR_TENSOR_DATA_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[elem.cudnn()],
        )?
        .set(A::CUDNN_ATTR_TENSOR_DIMENSIONS, Ty::CUDNN_TYPE_INT64, &dims)?
        .set(A::CUDNN_ATTR_TENSOR_STRIDES, Ty::CUDNN_TYPE_INT64, &strides)?
        .set(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, Ty::CUDNN_TYPE_INT64, &[uid])?
        .set(
            A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
            Ty::CUDNN_TYPE_INT64,
            &[16i64],
        )?;
        if kind == Kind::Virtual {
            t.set(
                A::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
                Ty::CUDNN_TYPE_BOOLEAN,
                &[true],
            )?;
        }
        if kind == Kind::Scalar {
            t.set(
                A::CUDNN_ATTR_TENSOR_IS_BY_VALUE,
                Ty::CUDNN_TYPE_BOOLEAN,
                &[true],
            )?;
        }
        self.tensors.insert(uid, t.finalize()?);
        Ok(())
    }

    fn t(&self, uid: i64) -> &Desc {
        &self.tensors[&uid]
    }

    /// `y = mode(x, b)` (`b` absent for unary modes; `t` the condition of a select; `axis` the
    /// axis of an index generator).
    fn pointwise(
        &mut self,
        mode: dnn::cudnnPointwiseMode_t,
        x: i64,
        b: Option<i64>,
        cond: Option<i64>,
        y: i64,
        axis: Option<i64>,
    ) -> Result<(), Error> {
        let prec = if mode == dnn::cudnnPointwiseMode_t::CUDNN_POINTWISE_CMP_GE {
            Elem::Bool
        } else {
            Elem::F32
        };
        let pw = Desc::new(D::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        pw.set(
            A::CUDNN_ATTR_POINTWISE_MODE,
            Ty::CUDNN_TYPE_POINTWISE_MODE,
            &[mode],
        )?
        .set(
            A::CUDNN_ATTR_POINTWISE_MATH_PREC,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[prec.cudnn()],
        )?;
        if let Some(axis) = axis {
            pw.set(A::CUDNN_ATTR_POINTWISE_AXIS, Ty::CUDNN_TYPE_INT64, &[axis])?;
        }
        let pw = pw.finalize()?;
        let op = Desc::new(D::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
        op.desc(A::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &pw)?
            .desc(A::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, self.t(x))?;
        if let Some(b) = b {
            op.desc(A::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, self.t(b))?;
        }
        if let Some(c) = cond {
            op.desc(A::CUDNN_ATTR_OPERATION_POINTWISE_TDESC, self.t(c))?;
        }
        op.desc(A::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, self.t(y))?
            .set(
                A::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1,
                Ty::CUDNN_TYPE_FLOAT,
                &[1f32],
            )?
            .set(
                A::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2,
                Ty::CUDNN_TYPE_FLOAT,
                &[1f32],
            )?;
        self.ops.push(op.finalize()?);
        // The pointwise descriptor is copied into the operation at finalization.
        drop(pw);
        Ok(())
    }

    fn unary(&mut self, mode: dnn::cudnnPointwiseMode_t, x: i64, y: i64) -> Result<(), Error> {
        self.pointwise(mode, x, None, None, y, None)
    }

    fn binary(
        &mut self,
        mode: dnn::cudnnPointwiseMode_t,
        x: i64,
        b: i64,
        y: i64,
    ) -> Result<(), Error> {
        self.pointwise(mode, x, Some(b), None, y, None)
    }

    /// `c = a b`, batched over the leading axes (broadcast where `b` has fewer heads).
    fn matmul(&mut self, a: i64, b: i64, c: i64) -> Result<(), Error> {
        let mm = Desc::new(D::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
        mm.set(
            A::CUDNN_ATTR_MATMUL_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[Elem::F32.cudnn()],
        )?;
        let mm = mm.finalize()?;
        let op = operation(
            D::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR,
            &[
                (A::CUDNN_ATTR_OPERATION_MATMUL_ADESC, self.t(a)),
                (A::CUDNN_ATTR_OPERATION_MATMUL_BDESC, self.t(b)),
                (A::CUDNN_ATTR_OPERATION_MATMUL_CDESC, self.t(c)),
                (A::CUDNN_ATTR_OPERATION_MATMUL_DESC, &mm),
            ],
        )?;
        self.ops.push(op);
        Ok(())
    }

    /// `y` = `x` reduced over the axes where `y` has size 1 (or fewer heads).
    fn reduce(&mut self, op_kind: dnn::cudnnReduceTensorOp_t, x: i64, y: i64) -> Result<(), Error> {
        let red = Desc::new(D::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
        red.set(
            A::CUDNN_ATTR_REDUCTION_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[Elem::F32.cudnn()],
        )?
        .set(
            A::CUDNN_ATTR_REDUCTION_OPERATOR,
            Ty::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
            &[op_kind],
        )?
        .set(
            A::CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC,
            Ty::CUDNN_TYPE_BOOLEAN,
            &[false],
        )?;
        let red = red.finalize()?;
        let op = operation(
            D::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR,
            &[
                (A::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &red),
                (A::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, self.t(x)),
                (A::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, self.t(y)),
            ],
        )?;
        self.ops.push(op);
        Ok(())
    }

    /// `y` = `x` seen with other dims, strides or type (a transpose, for instance).
    fn reshape(&mut self, x: i64, y: i64) -> Result<(), Error> {
        let op = operation(
            D::CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR,
            &[
                (A::CUDNN_ATTR_OPERATION_RESHAPE_XDESC, self.t(x)),
                (A::CUDNN_ATTR_OPERATION_RESHAPE_YDESC, self.t(y)),
            ],
        )?;
        self.ops.push(op);
        Ok(())
    }

    /// The operation graph, and the first plan of cuDNN's heuristic (mode A) that finalizes.
    fn plan(self, handle: dnn::cudnnHandle_t) -> Result<Plan, Error> {
        let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        let ops: Vec<_> = self.ops.iter().map(|o| o.0).collect();
        graph
            .set(
                A::CUDNN_ATTR_OPERATIONGRAPH_OPS,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                &ops,
            )?
            .set(
                A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
                Ty::CUDNN_TYPE_HANDLE,
                &[handle],
            )?;
        let graph = graph.finalize()?;
        let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.desc(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &graph)?
            .set(
                A::CUDNN_ATTR_ENGINEHEUR_MODE,
                Ty::CUDNN_TYPE_HEUR_MODE,
                &[dnn::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A],
            )?;
        let heur = heur.finalize()?;
        const MAX_CONFIGS: usize = 8;
        let configs = (0..MAX_CONFIGS)
            .map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
            .collect::<Result<Vec<_>, _>>()?;
        let mut raw: Vec<_> = configs.iter().map(|c| c.0).collect();
        let mut count = 0i64;
        // SAFETY: `raw` holds MAX_CONFIGS engine-config descriptors for cuDNN to fill.
        check("cudnnBackendGetAttribute(ENGINEHEUR_RESULTS)", unsafe {
            dnn::cudnnBackendGetAttribute(
                heur.0,
                A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                MAX_CONFIGS as i64,
                &mut count,
                raw.as_mut_ptr() as *mut c_void,
            )
        })?;
        let mut last = Error::Cuda {
            call: "cuDNN attention",
            detail: "the heuristic offered no engine for the graph".into(),
        };
        for config in configs.iter().take(count.max(0) as usize) {
            let attempt = (|| {
                let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
                plan.desc(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, config)?;
                // Older cuDNN wants the handle here too; newer ones take it from the graph.
                let _ = plan.set(
                    A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
                    Ty::CUDNN_TYPE_HANDLE,
                    &[handle],
                );
                let plan = plan.finalize()?;
                let mut workspace = 0i64;
                let mut n = 0i64;
                // SAFETY: one i64 out-value.
                check("cudnnBackendGetAttribute(WORKSPACE_SIZE)", unsafe {
                    dnn::cudnnBackendGetAttribute(
                        plan.0,
                        A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                        Ty::CUDNN_TYPE_INT64,
                        1,
                        &mut n,
                        &mut workspace as *mut i64 as *mut c_void,
                    )
                })?;
                Ok::<_, Error>((plan, workspace.max(0) as usize))
            })();
            match attempt {
                Ok((plan, workspace)) => {
                    return Ok(Plan {
                        plan,
                        workspace,
                        _keep: (
                            self.tensors.into_values().collect(),
                            self.ops,
                            graph,
                            configs,
                        ),
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// A finalized execution plan and the descriptors it was built from.
struct Plan {
    plan: Desc,
    workspace: usize,
    #[allow(clippy::type_complexity)]
    _keep: (Vec<Desc>, Vec<Desc>, Desc, Vec<Desc>),
}

impl Plan {
    /// Runs the plan on `stream` with `(uid, pointer)` bindings (device pointers, or host
    /// pointers for scalars).
    fn execute(
        &self,
        handle: dnn::cudnnHandle_t,
        stream: cudarc::driver::sys::CUstream,
        bindings: &[(i64, *mut c_void)],
        workspace: u64,
    ) -> Result<(), Error> {
        // SAFETY: the stream belongs to the context the handle was created in.
        check("cudnnSetStream", unsafe {
            dnn::cudnnSetStream(handle, stream as dnn::cudaStream_t)
        })?;
        let uids: Vec<i64> = bindings.iter().map(|b| b.0).collect();
        let ptrs: Vec<*mut c_void> = bindings.iter().map(|b| b.1).collect();
        let pack = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set(
            A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
            Ty::CUDNN_TYPE_INT64,
            &uids,
        )?
        .set(
            A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Ty::CUDNN_TYPE_VOID_PTR,
            &ptrs,
        )?
        .set(
            A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Ty::CUDNN_TYPE_VOID_PTR,
            &[workspace as *mut c_void],
        )?;
        let pack = pack.finalize()?;
        // SAFETY: the plan was built with this handle; the pack binds every non-virtual tensor.
        check("cudnnBackendExecute", unsafe {
            dnn::cudnnBackendExecute(handle, self.plan.0, pack.0)
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    Backward,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    pass: Pass,
    shape: Shape,
    /// q, k, v, o and (backward) dO strides: they are baked into the plan.
    strides: [Strides; 5],
}

struct State {
    handle: dnn::cudnnHandle_t,
    plans: HashMap<Key, Result<Arc<Plan>, String>>,
}

// SAFETY: the handle and plans are only used under the mutex below.
unsafe impl Send for State {}

static STATES: OnceLock<Mutex<HashMap<usize, State>>> = OnceLock::new();

/// Plans kept per device (forward and backward count apart).
const MAX_PLANS: usize = 64;

/// Runs `f` with device `ordinal`'s cuDNN handle and plans, its context current.
fn with_state<T>(
    ordinal: usize,
    f: impl FnOnce(&mut State) -> Result<T, Error>,
) -> Result<T, Error> {
    crate::backend::cuda::cublas::with_state(ordinal, |_| {
        let states = STATES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut guard = states.lock().map_err(|_| Error::Poisoned)?;
        let state = match guard.entry(ordinal) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut handle = std::ptr::null_mut();
                // SAFETY: out-pointer; the device's primary context is current (cublas state).
                check("cudnnCreate", unsafe { dnn::cudnnCreate(&mut handle) })?;
                v.insert(State {
                    handle,
                    plans: HashMap::new(),
                })
            }
        };
        f(state)
    })
}

/// The plan for `key`, built on first use; `None` (reported once) where cuDNN has none.
fn plan(
    ordinal: usize,
    key: Key,
    build: impl FnOnce() -> Result<Graph, Error>,
) -> Option<Arc<Plan>> {
    let found = with_state(ordinal, |state| {
        if let Some(p) = state.plans.get(&key) {
            return Ok(p.clone());
        }
        let handle = state.handle;
        let started = std::time::Instant::now();
        let built = build()
            .and_then(|g| g.plan(handle))
            .map(Arc::new)
            .map_err(|e| e.to_string());
        tracing::debug!(
            "cuDNN attention plan for {:?} ({:?}): {:.1} ms",
            key.shape,
            key.pass,
            started.elapsed().as_secs_f64() * 1e3
        );
        if let Err(e) = &built {
            tracing::warn!(
                "cuDNN attention unavailable for {:?} ({e}); using the flash kernels",
                key.shape
            );
        }
        // Each new sequence length (prefill in generation) makes a plan of ~0.1 s; a bound
        // keeps a long run's cache from growing without end.
        if state.plans.len() >= MAX_PLANS {
            state.plans.clear();
        }
        state.plans.insert(key, built.clone());
        Ok(built)
    });
    match found {
        Ok(Ok(plan)) => Some(plan),
        Ok(Err(_)) => None,
        Err(e) => {
            tracing::warn!("cuDNN unavailable ({e}); using the flash kernels");
            None
        }
    }
}

use dnn::cudnnPointwiseMode_t as Pw;
use dnn::cudnnReduceTensorOp_t as Red;

/// Dims and contiguous strides of the graph's intermediate shapes.
struct Layout {
    scores: [i64; 4],
    score_strides: Strides,
    /// The transpose of a score matrix, `[b, h, s, t]` over the same memory.
    scores_t: [i64; 4],
    scores_t_strides: Strides,
    rows: [i64; 4],
    row_strides: Strides,
    q: [i64; 4],
    kv: [i64; 4],
    kv_t: [i64; 4],
}

fn layout(s: &Shape) -> Layout {
    let [b, h, kvh, t, k, d] =
        [s.batch, s.heads, s.kv_heads, s.q_len, s.k_len, s.head_dim].map(|v| v as i64);
    Layout {
        scores: [b, h, t, k],
        score_strides: [h * t * k, t * k, k, 1],
        scores_t: [b, h, k, t],
        scores_t_strides: [h * t * k, t * k, 1, k],
        rows: [b, h, t, 1],
        row_strides: [h * t, t, 1, 1],
        q: [b, h, t, d],
        kv: [b, kvh, k, d],
        kv_t: [b, kvh, d, k],
    }
}

fn contiguous(dims: [i64; 4]) -> Strides {
    [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1]
}

/// The transposed view `[b, h, d, s]` of a `[b, h, s, d]` tensor with strides `st`.
fn transposed(st: Strides) -> Strides {
    [st[0], st[1], st[3], st[2]]
}

/// Causal mask over score tensor `x` into `y`: keys after the query are set to `neg` (uids
/// `row`, `col`, `keep` are the index and condition tensors).
fn causal_mask(
    g: &mut Graph,
    l: &Layout,
    x: i64,
    [row, col, keep, neg]: [i64; 4],
    y: i64,
) -> Result<(), Error> {
    g.tensor(row, Elem::I32, l.scores, l.score_strides, Kind::Virtual)?;
    g.tensor(col, Elem::I32, l.scores, l.score_strides, Kind::Virtual)?;
    g.tensor(keep, Elem::Bool, l.scores, l.score_strides, Kind::Virtual)?;
    g.tensor(neg, Elem::F32, [1; 4], [1; 4], Kind::Scalar)?;
    g.tensor(y, Elem::F32, l.scores, l.score_strides, Kind::Virtual)?;
    g.pointwise(Pw::CUDNN_POINTWISE_GEN_INDEX, x, None, None, col, Some(3))?;
    g.pointwise(Pw::CUDNN_POINTWISE_GEN_INDEX, x, None, None, row, Some(2))?;
    g.binary(Pw::CUDNN_POINTWISE_CMP_GE, row, col, keep)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_BINARY_SELECT,
        x,
        Some(neg),
        Some(keep),
        y,
        None,
    )
}

// Unique ids of the tensors bound at execution.
mod uid {
    pub const Q: i64 = 0;
    pub const K: i64 = 1;
    pub const V: i64 = 2;
    pub const O: i64 = 3;
    pub const SCALE: i64 = 5;
    pub const STATS: i64 = 8;
    // forward
    pub const FWD_NEG: i64 = 11;
    // backward
    pub const ONE: i64 = 7;
    pub const DO: i64 = 9;
    pub const DQ: i64 = 10;
    pub const DK: i64 = 11;
    pub const DV: i64 = 12;
    pub const ROW_SUM: i64 = 13;
    pub const BWD_NEG: i64 = 20;
    pub const DQ_ACC: i64 = 32;
}

fn forward_graph(s: &Shape, st: &[Strides; 5]) -> Result<Graph, Error> {
    let l = layout(s);
    let [qs, ks, vs, os, _] = *st;
    let mut g = Graph::default();
    g.tensor(uid::Q, Elem::Bf16, l.q, qs, Kind::Io)?;
    g.tensor(uid::K, Elem::Bf16, l.kv_t, transposed(ks), Kind::Io)?;
    g.tensor(uid::V, Elem::Bf16, l.kv, vs, Kind::Io)?;
    g.tensor(uid::O, Elem::Bf16, l.q, os, Kind::Io)?;
    g.tensor(uid::STATS, Elem::F32, l.rows, l.row_strides, Kind::Io)?;
    g.tensor(uid::SCALE, Elem::F32, [1; 4], [1; 4], Kind::Scalar)?;
    for id in [4, 6, 15, 16] {
        g.tensor(id, Elem::F32, l.scores, l.score_strides, Kind::Virtual)?;
    }
    g.tensor(13, Elem::Bf16, l.scores, l.score_strides, Kind::Virtual)?;
    for id in [14, 17, 18] {
        g.tensor(id, Elem::F32, l.rows, l.row_strides, Kind::Virtual)?;
    }
    g.matmul(uid::Q, uid::K, 4)?;
    g.binary(Pw::CUDNN_POINTWISE_MUL, 4, uid::SCALE, 6)?;
    causal_mask(&mut g, &l, 6, [7, 9, 10, uid::FWD_NEG], 12)?;
    // Softmax with its statistics: max, exp(x - max), sum, log-sum-exp = max + log(sum).
    g.reduce(Red::CUDNN_REDUCE_TENSOR_MAX, 12, 14)?;
    g.binary(Pw::CUDNN_POINTWISE_SUB, 12, 14, 15)?;
    g.unary(Pw::CUDNN_POINTWISE_EXP, 15, 16)?;
    g.reduce(Red::CUDNN_REDUCE_TENSOR_ADD, 16, 17)?;
    g.unary(Pw::CUDNN_POINTWISE_LOG, 17, 18)?;
    g.binary(Pw::CUDNN_POINTWISE_ADD, 14, 18, uid::STATS)?;
    g.binary(Pw::CUDNN_POINTWISE_DIV, 16, 17, 13)?;
    g.matmul(13, uid::V, uid::O)?;
    Ok(g)
}

fn backward_graph(s: &Shape, st: &[Strides; 5]) -> Result<Graph, Error> {
    let l = layout(s);
    let [qs, ks, vs, os, dos] = *st;
    let mut g = Graph::default();
    g.tensor(uid::Q, Elem::Bf16, l.q, qs, Kind::Io)?;
    g.tensor(uid::K, Elem::Bf16, l.kv_t, transposed(ks), Kind::Io)?;
    g.tensor(uid::V, Elem::Bf16, l.kv_t, transposed(vs), Kind::Io)?;
    g.tensor(uid::O, Elem::Bf16, l.q, os, Kind::Io)?;
    g.tensor(uid::DO, Elem::Bf16, l.q, dos, Kind::Io)?;
    g.tensor(uid::STATS, Elem::F32, l.rows, l.row_strides, Kind::Io)?;
    g.tensor(uid::DQ, Elem::Bf16, l.q, contiguous(l.q), Kind::Io)?;
    g.tensor(uid::DK, Elem::Bf16, l.kv, contiguous(l.kv), Kind::Io)?;
    g.tensor(uid::DV, Elem::Bf16, l.kv, contiguous(l.kv), Kind::Io)?;
    g.tensor(uid::ROW_SUM, Elem::F32, l.rows, l.row_strides, Kind::Io)?;
    g.tensor(uid::DQ_ACC, Elem::F32, l.q, contiguous(l.q), Kind::Io)?;
    g.tensor(uid::SCALE, Elem::F32, [1; 4], [1; 4], Kind::Scalar)?;
    g.tensor(uid::ONE, Elem::F32, [1; 4], [1; 4], Kind::Scalar)?;
    g.tensor(4, Elem::F32, l.q, contiguous(l.q), Kind::Virtual)?;
    g.tensor(6, Elem::F32, l.rows, l.row_strides, Kind::Virtual)?;
    for id in [14, 15, 16, 22, 25, 26, 27, 28] {
        g.tensor(id, Elem::F32, l.scores, l.score_strides, Kind::Virtual)?;
    }
    for id in [23, 29] {
        g.tensor(
            id,
            Elem::Bf16,
            l.scores_t,
            l.scores_t_strides,
            Kind::Virtual,
        )?;
    }
    let per_head = [l.q[0], l.q[1], l.kv[2], l.q[3]];
    for id in [24, 30] {
        g.tensor(
            id,
            Elem::Bf16,
            per_head,
            contiguous(per_head),
            Kind::Virtual,
        )?;
    }
    g.tensor(31, Elem::F32, l.kv, contiguous(l.kv), Kind::Virtual)?;

    g.matmul(uid::DO, uid::V, 25)?; // dP = dO V^T
    g.matmul(uid::Q, uid::K, 14)?; // S = Q K^T
    g.binary(Pw::CUDNN_POINTWISE_MUL, uid::DO, uid::O, 4)?;
    g.reshape(uid::K, 31)?;
    g.binary(Pw::CUDNN_POINTWISE_MUL, 14, uid::SCALE, 15)?;
    g.binary(Pw::CUDNN_POINTWISE_SUB, 15, uid::STATS, 16)?;
    causal_mask(&mut g, &l, 16, [17, 18, 19, uid::BWD_NEG], 21)?;
    g.unary(Pw::CUDNN_POINTWISE_EXP, 21, 22)?; // P
    g.reshape(22, 23)?;
    g.matmul(23, uid::DO, 24)?; // dV per query head = P^T dO
    g.reduce(Red::CUDNN_REDUCE_TENSOR_ADD, 4, 6)?;
    g.binary(Pw::CUDNN_POINTWISE_MUL, 6, uid::ONE, uid::ROW_SUM)?; // rowsum(dO * O)
    g.binary(Pw::CUDNN_POINTWISE_SUB, 25, uid::ROW_SUM, 26)?;
    g.binary(Pw::CUDNN_POINTWISE_MUL, 26, 22, 27)?;
    g.binary(Pw::CUDNN_POINTWISE_MUL, 27, uid::SCALE, 28)?; // dS
    g.matmul(28, 31, uid::DQ_ACC)?; // dQ = dS K
    g.unary(Pw::CUDNN_POINTWISE_IDENTITY, uid::DQ_ACC, uid::DQ)?;
    g.reshape(28, 29)?;
    g.matmul(29, uid::Q, 30)?; // dK per query head = dS^T Q
    g.reduce(Red::CUDNN_REDUCE_TENSOR_ADD, 30, uid::DK)?;
    g.reduce(Red::CUDNN_REDUCE_TENSOR_ADD, 24, uid::DV)?;
    Ok(g)
}

/// Queues `plan` on cubecl's stream over `tensors` (bound to `uids` in order; the last tensor is
/// an output) with a fresh workspace and the scalars `(uid, value)`.
fn submit(
    ordinal: usize,
    plan: Arc<Plan>,
    tensors: &[(i64, &CT)],
    scalars: Vec<(i64, f32)>,
    what: &'static str,
) {
    let out = tensors.last().expect("an output").1;
    let client = out.client.clone();
    let workspace = client.empty(plan.workspace.max(16));
    let uids: Vec<i64> = tensors.iter().map(|t| t.0).collect();
    let mut handles: Vec<_> = vec![workspace];
    handles.extend(tensors.iter().map(|t| t.1.handle.clone()));
    crate::backend::cuda::queue::submit(&client, handles, what, move |r| {
        let mut scalars = scalars;
        let mut bindings: Vec<(i64, *mut c_void)> = uids
            .iter()
            .zip(&r.ptrs[1..])
            .map(|(&u, &p)| (u, p as *mut c_void))
            .collect();
        for (u, v) in scalars.iter_mut() {
            bindings.push((*u, v as *mut f32 as *mut c_void));
        }
        with_state(ordinal, |state| {
            plan.execute(state.handle, r.stream, &bindings, r.ptrs[0])
        })
    });
}

/// The device of `q` and the plan of `pass` for this shape and these strides (see [`plan`]).
fn plan_for(pass: Pass, q: &CT, shape: Shape, st: [Strides; 5]) -> Option<(usize, Arc<Plan>)> {
    let graph = match pass {
        Pass::Forward => forward_graph,
        Pass::Backward => backward_graph,
    };
    let key = Key {
        pass,
        shape,
        strides: st,
    };
    let ordinal = q.device.index;
    plan(ordinal, key, || graph(&shape, &st)).map(|p| (ordinal, p))
}

/// `(o [b, t, h, d], lse [b, h, t] f32)`, as the flash forward; `None` where this path does
/// not apply or cuDNN has no plan (the caller runs the flash kernels).
pub fn forward(q: &CT, k: &CT, v: &CT, shape: Shape, scale: f64) -> Option<(CT, CT)> {
    let (h, d, t) = (
        shape.heads as i64,
        shape.head_dim as i64,
        shape.q_len as i64,
    );
    let os = [t * h * d, d, h * d, 1];
    let st = [strides(q), strides(k), strides(v), os, [0; 4]];
    let (ordinal, plan) = plan_for(Pass::Forward, q, shape, st)?;
    let o = empty(
        q,
        vec![shape.batch, shape.q_len, shape.heads, shape.head_dim],
        DType::BF16,
    );
    let lse = empty(q, vec![shape.batch, shape.heads, shape.q_len], DType::F32);
    submit(
        ordinal,
        plan,
        &[
            (uid::Q, q),
            (uid::K, k),
            (uid::V, v),
            (uid::STATS, &lse),
            (uid::O, &o),
        ],
        vec![(uid::SCALE, scale as f32), (uid::FWD_NEG, f32::MIN)],
        "cuDNN attention forward",
    );
    Some((o, lse))
}

/// `(dq, dk, dv)` in bf16, contiguous, from the forward's `o` and `lse` and `dout` (`o` and
/// `dout` are `[b, t, h, d]`); `None` as in [`forward`].
#[allow(clippy::too_many_arguments)]
pub fn backward<F: FloatElement, I: IntElement, BT: BoolElement>(
    q: &CT,
    k: &CT,
    v: &CT,
    o: &CT,
    lse: &CT,
    dout: &CT,
    shape: Shape,
    scale: f64,
) -> Option<(CT, CT, CT)> {
    let st = [
        strides(q),
        strides(k),
        strides(v),
        strides_bthd(o),
        strides_bthd(dout),
    ];
    let (ordinal, plan) = plan_for(Pass::Backward, q, shape, st)?;
    let (b, h, kvh, t, s, d) = (
        shape.batch,
        shape.heads,
        shape.kv_heads,
        shape.q_len,
        shape.k_len,
        shape.head_dim,
    );
    let dq = empty(q, vec![b, h, t, d], DType::BF16);
    let dk = empty(q, vec![b, kvh, s, d], DType::BF16);
    let dv = empty(q, vec![b, kvh, s, d], DType::BF16);
    let row_sum = empty(q, vec![b, h, t], DType::F32);
    // The engine adds dQ into this f32 buffer tile by tile.
    let dq_acc = Tensor::<Cube<F, I, BT>, 4>::zeros([b, h, t, d], (&q.device, DType::F32))
        .into_primitive()
        .tensor();
    submit(
        ordinal,
        plan,
        &[
            (uid::Q, q),
            (uid::K, k),
            (uid::V, v),
            (uid::O, o),
            (uid::DO, dout),
            (uid::STATS, lse),
            (uid::ROW_SUM, &row_sum),
            (uid::DQ_ACC, &dq_acc),
            (uid::DK, &dk),
            (uid::DV, &dv),
            (uid::DQ, &dq),
        ],
        vec![
            (uid::SCALE, scale as f32),
            (uid::ONE, 1.0),
            (uid::BWD_NEG, f32::MIN),
        ],
        "cuDNN attention backward",
    );
    Some((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(t: usize, s: usize, d: usize) -> Shape {
        Shape {
            batch: 2,
            heads: 14,
            kv_heads: 2,
            q_len: t,
            k_len: s,
            head_dim: d,
        }
    }

    #[test]
    fn the_graphs_cover_causal_attention_over_equal_lengths_without_padding() {
        assert!(graph_covers(&shape(1024, 1024, 64), true, false));
        assert!(graph_covers(&shape(7, 7, 128), true, false));
        // Decoding and prefill after a cache need the bottom-right diagonal: flash kernels.
        assert!(!graph_covers(&shape(1, 77, 64), true, false));
        assert!(!graph_covers(&shape(1024, 1024, 64), true, true));
        assert!(!graph_covers(&shape(1024, 1024, 64), false, false));
        assert!(!graph_covers(&shape(1024, 1024, 96), true, false));
    }

    #[test]
    fn the_transposed_score_view_reads_the_same_memory_as_the_scores() {
        let l = layout(&shape(3, 5, 64));
        assert_eq!(l.scores, [2, 14, 3, 5]);
        assert_eq!(l.scores_t, [2, 14, 5, 3]);
        // Element (query i, key j) of the scores sits where element (key j, query i) of the
        // transposed view does.
        let at = |st: Strides, idx: [i64; 4]| idx.iter().zip(st).map(|(i, s)| i * s).sum::<i64>();
        for (i, j) in [(0, 0), (2, 4), (1, 3)] {
            assert_eq!(
                at(l.score_strides, [1, 5, i, j]),
                at(l.scores_t_strides, [1, 5, j, i])
            );
        }
        assert_eq!(l.rows, [2, 14, 3, 1]);
        assert_eq!(l.row_strides, [14 * 3, 3, 1, 1]);
        assert_eq!(l.kv_t, [2, 2, 64, 5]);
        assert_eq!(transposed([10, 20, 64, 1]), [10, 20, 1, 64]);
        assert_eq!(contiguous([2, 14, 3, 64]), [14 * 3 * 64, 3 * 64, 64, 1]);
    }
}
