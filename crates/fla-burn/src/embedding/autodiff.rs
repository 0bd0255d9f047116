//! `Autodiff<B>`: the lookup on the inner backend, recorded as one graph node over the table
//! whose backward is the fused one (`B::embedding_weight_grad`). The node keeps the ids and the
//! table's row count; the ids take no gradient.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorMetadata};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};

use fla_cubecl_kernels::embedding::EmbeddingProblem;

use super::{describe, EmbeddingBackend};
use crate::FlaError;

#[derive(Debug)]
struct Node;

impl<B: EmbeddingBackend> Backward<B, 1> for Node {
    /// The ids and the table's rows.
    type State = (IntTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _c: &mut Checkpointer) {
        let (ids, vocab) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let dw =
            B::embedding_weight_grad(dy, ids, vocab).expect("the forward validated these inputs");
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B: EmbeddingBackend, C: CheckpointStrategy> EmbeddingBackend for Autodiff<B, C> {
    fn embedding_forward(
        weight: FloatTensor<Self>,
        ids: IntTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        let p = describe::<Self>(&weight, &ids)?;
        // What the backward needs of the device (its dtype is the table's), refused now rather
        // than inside the backward pass.
        B::embedding_check(
            &B::float_device(&weight.primitive),
            weight.primitive.dtype(),
            &p,
        )?;
        let rows = B::embedding_forward(weight.primitive, ids.clone())?;
        Ok(
            match Node.prepare::<C>([weight.node]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((ids, p.vocab), rows),
                OpsKind::UnTracked(prep) => prep.finish(rows),
            },
        )
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn embedding_weight_grad(
        dy: FloatTensor<Self>,
        ids: IntTensor<Self>,
        vocab: usize,
    ) -> Result<FloatTensor<Self>, FlaError> {
        let dw = B::embedding_weight_grad(dy.primitive, ids, vocab)?;
        Ok(<Self as AutodiffBackend>::from_inner(dw))
    }

    fn embedding_check(
        device: &Self::Device,
        dtype: DType,
        p: &EmbeddingProblem,
    ) -> Result<(), FlaError> {
        B::embedding_check(device, dtype, p)
    }
}
