//! `Autodiff<B>`: the forward on the inner backend, recorded as one graph node over the logits
//! whose backward is the hand-derived one (`B::cross_entropy_backward`). The node keeps the
//! logits, the targets and `lse`; the targets take no gradient.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::DType;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};

use super::{describe, CrossEntropyBackend};
use crate::FlaError;

#[derive(Debug)]
struct Node;

impl<B: CrossEntropyBackend> Backward<B, 1> for Node {
    /// The logits, the targets and `lse`.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _c: &mut Checkpointer) {
        let (logits, targets, lse) = ops.state;
        let dloss = grads.consume::<B>(&ops.node);
        let dx = B::cross_entropy_backward(logits, targets, lse, dloss)
            .expect("the forward validated these inputs");
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, dx);
        }
    }
}

impl<B: CrossEntropyBackend, C: CheckpointStrategy> CrossEntropyBackend for Autodiff<B, C> {
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> Result<(FloatTensor<Self>, FloatTensor<Self>), FlaError> {
        describe::<Self>(&logits, &targets)?;
        let (loss, lse) = B::cross_entropy_forward(logits.primitive.clone(), targets.clone())?;
        let loss = match Node.prepare::<C>([logits.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((logits.primitive, targets, lse.clone()), loss),
            OpsKind::UnTracked(prep) => prep.finish(loss),
        };
        // `lse` comes back as a constant: no gradient flows through it.
        Ok((loss, <Self as AutodiffBackend>::from_inner(lse)))
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        let dx =
            B::cross_entropy_backward(logits.primitive, targets, lse.primitive, dloss.primitive)?;
        Ok(<Self as AutodiffBackend>::from_inner(dx))
    }

    fn cross_entropy_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::cross_entropy_check_dtype(device, dtype)
    }
}
