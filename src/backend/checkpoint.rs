//! Activation checkpointing of whole layers (torch's `torch.utils.checkpoint`): under
//! `Autodiff` a checkpointed layer is one node of the graph that keeps only the layer's inputs;
//! its backward step runs the layer again under a fresh graph and back-propagates through that
//! replay. The layer's trainable parameters get their gradients through stand-in leaves (see
//! [`with_stand_ins`]), registered under the parameters' own nodes, so the optimizer finds them
//! as if the layer had been recorded normally. With `offload` the kept inputs wait in host
//! memory until the layer's backward step.
//!
//! burn 0.21 has no nested backward pass; vendor/burn-autodiff makes its graph cleanup skip the
//! graph whose backward step is running (see its RUNNER_PATCH.md).
//!
//! Reference: Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; Unsloth's
//! `unsloth_zoo/gradient_checkpointing.py` (offloaded layer inputs).

use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, ops::FloatTensor, Tensor, TensorPrimitive};

/// How [`LayerReplay::replay`] runs its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayMode {
    /// With the layer's own parameters, recorded as usual: no checkpointing.
    Plain,
    /// Nothing recorded for a backward pass: the forward pass of a checkpointed layer.
    Untracked,
    /// Recorded against stand-in leaves for the layer's trainable parameters, so that a backward
    /// pass over the replay yields their gradients: the recompute in the backward step.
    StandIns,
}

/// Pairs of (a layer's trainable parameter, the leaf that stood in for it).
pub type StandInPairs<B> = Vec<(FloatTensor<B>, FloatTensor<B>)>;

/// The output of one [`LayerReplay::replay`].
pub struct Replayed<B: Backend> {
    pub output: Tensor<B, 3>,
    /// With [`ReplayMode::StandIns`]: each trainable parameter of the layer and the leaf that
    /// stood in for it.
    pub stand_ins: StandInPairs<B>,
}

/// A layer call that can be run again: the layer, and whatever besides its inputs it reads
/// (rotary tables, masks), owned so that it outlives the forward pass.
pub trait LayerReplay<B: Backend>: Send {
    /// Runs the layer on `inputs` (the hidden states first, then any per-layer inputs such as a
    /// prefix's keys and values), each `[rows, seq, width]`.
    fn replay(&self, inputs: Vec<Tensor<B, 3>>, mode: ReplayMode) -> Replayed<B>;

    /// One trainable parameter of the layer, if it has any. It links the checkpointed layer to
    /// the graph, so the layer's backward step runs even when its inputs need no gradient
    /// (the first layer under LoRA).
    fn anchor(&self) -> Option<FloatTensor<B>>;
}

/// The layer behind a checkpoint node, shared between the node and its backward step.
pub(crate) type SharedReplay<B> = Arc<Mutex<Box<dyn LayerReplay<B>>>>;

/// Runs `layer` on `inputs`; when `B` records a graph, as a checkpoint that keeps only the
/// inputs (in host memory with `offload`) and recomputes the layer in the backward pass.
/// Backends that record nothing run the layer plainly.
pub fn checkpointed<B: Backend>(
    inputs: Vec<Tensor<B, 3>>,
    layer: Box<dyn LayerReplay<B>>,
    offload: bool,
) -> Tensor<B, 3> {
    crate::backend::dispatch::checkpointed_layer(inputs, layer, offload)
}

/// Replaces every trainable float parameter of `module` by a new leaf that requires a gradient
/// and holds the same values, and returns the pairs (parameter, stand-in).
pub fn with_stand_ins<B: Backend, M: Module<B>>(module: M) -> (M, StandInPairs<B>) {
    let mut mapper = StandIns { pairs: Vec::new() };
    let module = module.map(&mut mapper);
    (module, mapper.pairs)
}

struct StandIns<B: Backend> {
    pairs: StandInPairs<B>,
}

impl<B: Backend> ModuleMapper<B> for StandIns<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if !tensor.is_require_grad() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let stand_in = tensor.clone().detach().require_grad();
        self.pairs.push((
            tensor.into_primitive().tensor(),
            stand_in.clone().into_primitive().tensor(),
        ));
        Param::from_mapped_value(id, stand_in, mapper)
    }
}

/// The first trainable float parameter of `module` (see [`LayerReplay::anchor`]).
pub fn first_trainable<B: Backend, M: Module<B>>(module: &M) -> Option<FloatTensor<B>> {
    let mut visitor = FirstTrainable { found: None };
    module.visit(&mut visitor);
    visitor.found
}

struct FirstTrainable<B: Backend> {
    found: Option<FloatTensor<B>>,
}

impl<B: Backend> ModuleVisitor<B> for FirstTrainable<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.found.is_none() {
            let value = param.val();
            if value.is_require_grad() {
                self.found = Some(value.into_primitive().tensor());
            }
        }
    }
}

/// Runs a replay in [`ReplayMode::Plain`]: what backends without a graph do.
pub(crate) fn run_plain<B: Backend>(
    inputs: Vec<Tensor<B, 3>>,
    layer: Box<dyn LayerReplay<B>>,
) -> Tensor<B, 3> {
    layer.replay(inputs, ReplayMode::Plain).output
}

pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

mod autodiff {
    //! The checkpoint node under `Autodiff<B, C>`.

    use super::*;
    use crate::backend::offload::{Offloaded, Prefetch};
    use crate::backend::FastOps;
    use burn::backend::autodiff::{
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
        Autodiff, NodeId,
    };
    use burn::tensor::backend::AutodiffBackend;
    use std::sync::Weak;

    type Ad<B, C> = Autodiff<B, C>;
    type AdTensor<B, C> = FloatTensor<Ad<B, C>>;

    /// A new leaf holding `x` (no gradient unless asked for).
    fn leaf<B: Backend, C: CheckpointStrategy>(x: FloatTensor<B>) -> AdTensor<B, C> {
        <Ad<B, C> as AutodiffBackend>::from_inner(x)
    }

    /// A kept layer input: on the device, or in host memory until the backward step.
    #[derive(Clone, Debug)]
    enum Kept<B: FastOps> {
        Device(FloatTensor<B>),
        Host(Arc<Offloaded<B>>),
    }

    thread_local! {
        /// The input offloaded last on this thread: the checkpoint made next comes before it in
        /// the backward pass, and brings it back while its own layer is recomputed.
        static LAST_OFFLOADED: std::cell::RefCell<Option<Weak<dyn Prefetch>>> =
            const { std::cell::RefCell::new(None) };
    }

    impl<B: FastOps> Kept<B> {
        /// With `offload`, also returns the input offloaded before this one.
        fn new(x: FloatTensor<B>, offload: bool) -> (Self, Option<Weak<dyn Prefetch>>) {
            if !offload {
                return (Self::Device(x), None);
            }
            let parked = Arc::new(B::fast_offload(x));
            let weak: Weak<dyn Prefetch> = Arc::downgrade(&(parked.clone() as Arc<dyn Prefetch>));
            let previous = LAST_OFFLOADED.with(|last| last.borrow_mut().replace(weak));
            (Self::Host(parked), previous)
        }

        fn restore(self) -> FloatTensor<B> {
            match self {
                Self::Device(x) => x,
                Self::Host(parked) => parked.restore(),
            }
        }
    }

    pub(super) struct State<B: FastOps, C: CheckpointStrategy> {
        inputs: Vec<Kept<B>>,
        /// The offloaded input of the layer whose backward step comes next.
        prefetch_next: Option<Weak<dyn Prefetch>>,
        replay: SharedReplay<Ad<B, C>>,
        /// Per parent of the node: the input it is, or `None` for the anchor parameter.
        roles: Vec<Option<usize>>,
    }

    impl<B: FastOps, C: CheckpointStrategy> Clone for State<B, C> {
        fn clone(&self) -> Self {
            Self {
                inputs: self.inputs.clone(),
                prefetch_next: self.prefetch_next.clone(),
                replay: self.replay.clone(),
                roles: self.roles.clone(),
            }
        }
    }

    impl<B: FastOps, C: CheckpointStrategy> std::fmt::Debug for State<B, C> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CheckpointState")
                .field("inputs", &self.inputs.len())
                .field("roles", &self.roles)
                .finish()
        }
    }

    struct CheckpointBackward<C>(std::marker::PhantomData<C>);

    impl<C> std::fmt::Debug for CheckpointBackward<C> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CheckpointBackward")
        }
    }

    impl<B: FastOps, C: CheckpointStrategy, const N: usize> Backward<B, N> for CheckpointBackward<C> {
        type State = State<B, C>;

        fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node);
            let State {
                inputs,
                prefetch_next,
                replay,
                roles,
            } = ops.state;
            // Which node each input's gradient goes to.
            let mut input_nodes: Vec<Option<NodeId>> = vec![None; inputs.len()];
            for (role, parent) in roles.iter().zip(ops.parents.iter()) {
                if let (Some(i), Some(node)) = (role, parent) {
                    input_nodes[*i] = Some(node.id);
                }
            }
            let restored: Vec<FloatTensor<B>> = inputs.into_iter().map(Kept::restore).collect();
            // The next layer's input goes back on the device while this layer is recomputed.
            if let Some(next) = prefetch_next.and_then(|weak| weak.upgrade()) {
                next.prefetch();
            }
            let leaves: Vec<Tensor<Ad<B, C>, 3>> = restored
                .into_iter()
                .zip(&input_nodes)
                .map(|(x, node)| {
                    let leaf: Tensor<Ad<B, C>, 3> = float(leaf::<B, C>(x));
                    if node.is_some() {
                        leaf.require_grad()
                    } else {
                        leaf
                    }
                })
                .collect();
            #[cfg(test)]
            RECOMPUTES.with(|n| n.set(n.get() + 1));
            let replayed = replay
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .replay(leaves.clone(), ReplayMode::StandIns);
            // d(sum(y * g))/d(.) is the vector-Jacobian product with the output's gradient g.
            let seed: Tensor<Ad<B, C>, 3> = float(leaf::<B, C>(grad));
            let inner = replayed.output.mul(seed).sum().backward();
            for (leaf, node) in leaves.iter().zip(input_nodes) {
                if let (Some(node), Some(g)) = (node, leaf.grad(&inner)) {
                    grads.register::<B>(node, g.into_primitive().tensor());
                }
            }
            for (param, stand_in) in replayed.stand_ins {
                if let Some(g) = inner.get::<B>(&stand_in) {
                    grads.register::<B>(param.node.id, g);
                }
            }
        }
    }

    /// Records the node with its `N` parents.
    macro_rules! finish {
        ($n:literal, $nodes:expr, $state:expr, $output:expr) => {{
            let nodes: [_; $n] = $nodes
                .try_into()
                .unwrap_or_else(|_| unreachable!("the caller counted the parents"));
            match CheckpointBackward::<C>(std::marker::PhantomData)
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish($state, $output),
                OpsKind::UnTracked(prep) => prep.finish($output),
            }
        }};
    }

    /// The checkpoint node: the layer runs untracked now and again, tracked, in the node's
    /// backward step.
    pub(crate) fn checkpointed<B: FastOps, C: CheckpointStrategy>(
        inputs: Vec<AdTensor<B, C>>,
        layer: Box<dyn LayerReplay<Ad<B, C>>>,
        offload: bool,
    ) -> AdTensor<B, C> {
        let untracked: Vec<Tensor<Ad<B, C>, 3>> = inputs
            .iter()
            .map(|x| float(leaf::<B, C>(x.primitive.clone())))
            .collect();
        let output = layer
            .replay(untracked, ReplayMode::Untracked)
            .output
            .into_primitive()
            .tensor()
            .primitive;
        let mut nodes = Vec::new();
        let mut roles = Vec::new();
        for (i, x) in inputs.iter().enumerate() {
            if x.is_tracked() {
                nodes.push(x.node.clone());
                roles.push(Some(i));
            }
        }
        if let Some(anchor) = layer.anchor().filter(|a| a.is_tracked()) {
            nodes.push(anchor.node.clone());
            roles.push(None);
        }
        if nodes.is_empty() {
            // Nothing needs a gradient: nothing to keep, nothing to offload.
            return leaf::<B, C>(output);
        }
        let mut prefetch_next = None;
        let kept = inputs
            .into_iter()
            .map(|x| {
                let (kept, previous) = Kept::new(x.primitive, offload);
                prefetch_next = prefetch_next.take().or(previous);
                kept
            })
            .collect();
        let state = State {
            inputs: kept,
            prefetch_next,
            replay: Arc::new(Mutex::new(layer)),
            roles,
        };
        match nodes.len() {
            1 => finish!(1, nodes, state, output),
            2 => finish!(2, nodes, state, output),
            3 => finish!(3, nodes, state, output),
            4 => finish!(4, nodes, state, output),
            n => panic!("a checkpointed layer takes at most three inputs and an anchor, got {n}"),
        }
    }
}

pub(crate) use autodiff::checkpointed as autodiff_checkpointed;

#[cfg(test)]
thread_local! {
    /// Layers recomputed by backward passes on this thread (tests check that checkpointing ran).
    pub(crate) static RECOMPUTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
