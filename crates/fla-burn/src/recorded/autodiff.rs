//! Records a family's forward in `Autodiff<B>` as one graph node whose backward is the family's
//! hand-derived one.
//!
//! A Burn backward node has one output tensor. When the final state is requested, `o` and `hT`
//! are packed into one flat `f32` output of the node, and the tensors handed back are
//! differentiable slices of it: a gradient reaching either lands in the packed gradient, which
//! the backward splits again. Without `hT`, or when `hT` is only saved for the backward
//! ([`StateOp::SAVED_HT`]), `o` is the node's output as it is.

use std::marker::PhantomData;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape, Slice, TensorMetadata};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};

use super::{Inputs, Outputs, StateOp};
use crate::gated::float_dtype;
use crate::FlaError;

#[derive(Debug)]
struct Node<O>(PhantomData<O>);

#[derive(Debug, Clone)]
struct Saved<B: Backend, O> {
    op: O,
    x: Inputs<B>,
    /// The output, kept only for an op whose backward reads it ([`StateOp::READS_OUTPUTS`]):
    /// kept otherwise, it would live until the backward where the graph had freed it (a
    /// projection's output after the residual add).
    o: Option<FloatTensor<B>>,
    o_shape: Shape,
    o_dtype: DType,
    ht: Option<FloatTensor<B>>,
    /// The intermediate the forward kept for the backward ([`Outputs::aux`]).
    aux: Option<FloatTensor<B>>,
}

impl<B: Backend, O: StateOp<B>> Backward<B, 6> for Node<O> {
    type State = Saved<B, O>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _c: &mut Checkpointer) {
        let s = ops.state;
        let packed = grads.consume::<B>(&ops.node);
        let (d_o, d_ht) = match &s.ht {
            None => (packed, None),
            Some(_) if O::SAVED_HT => (packed, None),
            Some(ht) => {
                let o_shape = s.o_shape.clone();
                let n_o = o_shape.num_elements();
                let n_h = ht.shape().num_elements();
                let d_o = B::float_slice(packed.clone(), &[Slice::from(0..n_o)]);
                let d_o = B::float_cast(B::float_reshape(d_o, o_shape), float_dtype(s.o_dtype));
                let d_h = B::float_slice(packed, &[Slice::from(n_o..n_o + n_h)]);
                (d_o, Some(B::float_reshape(d_h, ht.shape())))
            }
        };
        let out = match s.o {
            Some(o) if O::READS_OUTPUTS => Some(Outputs {
                o,
                ht: s.ht,
                aux: s.aux,
            }),
            _ => None,
        };
        let computed =
            s.op.backward(s.x, out, d_o, d_ht)
                .expect("the forward validated these inputs");
        for (node, grad) in ops.parents.into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// Runs `op` on the inner backend and records it; `x` has been validated by the family.
pub(crate) fn forward<B: Backend, C: CheckpointStrategy, O: StateOp<B>>(
    op: &O,
    x: Inputs<Autodiff<B, C>>,
) -> Result<Outputs<Autodiff<B, C>>, FlaError> {
    let device = x[0]
        .as_ref()
        .map(<Autodiff<B, C> as FloatTensorOps<Autodiff<B, C>>>::float_device)
        .ok_or_else(|| FlaError::Shape("the first input is required".into()))?;
    // Absent optional inputs take the place of an untracked constant, which gets no gradient.
    let nodes = x.each_ref().map(|t| match t {
        Some(t) => t.node.clone(),
        None => Autodiff::<B, C>::float_zeros([1].into(), &device, FloatDType::F32).node,
    });
    let inner: Inputs<B> = x.map(|t| t.map(|t| t.primitive));
    let out = op.forward(inner.clone())?;
    let o_shape = out.o.shape();
    let dtype = out.o.dtype();

    // The node's single output: o alone, or o and hT packed flat in f32.
    let output = match &out.ht {
        None => out.o.clone(),
        Some(_) if O::SAVED_HT => out.o.clone(),
        Some(ht) => {
            let o_flat = B::float_reshape(
                B::float_cast(out.o.clone(), FloatDType::F32),
                [o_shape.num_elements()].into(),
            );
            let h_flat = B::float_reshape(ht.clone(), [ht.shape().num_elements()].into());
            B::float_cat(vec![o_flat, h_flat], 0)
        }
    };
    let node = match Node::<O>(PhantomData)
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                op: op.clone(),
                x: inner,
                o: O::READS_OUTPUTS.then(|| out.o.clone()),
                o_shape: o_shape.clone(),
                o_dtype: dtype,
                ht: out.ht.clone(),
                aux: out.aux,
            },
            output,
        ),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    type A<B, C> = Autodiff<B, C>;
    match out.ht {
        None => Ok(Outputs {
            o: node,
            ht: None,
            aux: None,
        }),
        // A saved intermediate comes back as a constant: no gradient flows through it.
        Some(ht) if O::SAVED_HT => Ok(Outputs {
            o: node,
            ht: Some(<A<B, C> as burn::tensor::backend::AutodiffBackend>::from_inner(ht)),
            aux: None,
        }),
        Some(ht) => {
            let n_o = o_shape.num_elements();
            let h_shape: Shape = ht.shape();
            let n_h = h_shape.num_elements();
            let o = A::<B, C>::float_slice(node.clone(), &[Slice::from(0..n_o)]);
            let o = A::<B, C>::float_reshape(o, o_shape);
            let o = A::<B, C>::float_cast(o, float_dtype(dtype));
            let h = A::<B, C>::float_slice(node, &[Slice::from(n_o..n_o + n_h)]);
            Ok(Outputs {
                o,
                ht: Some(A::<B, C>::float_reshape(h, h_shape)),
                aux: None,
            })
        }
    }
}
