//! `Autodiff<B>`: the forward on the inner backend, recorded as one graph node whose backward is
//! the hand-derived one (`B::gated_recurrent_backward`).
//!
//! A Burn backward node has one output tensor. When the final state is requested, `o` and `hT`
//! are packed into one flat `f32` output of the node, and the tensors handed back are
//! differentiable slices of it: a gradient reaching either lands in the packed gradient, which
//! the backward splits again. Without `hT`, `o` is the node's output as it is.

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, Slice, TensorMetadata};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};

use super::{
    describe, float_dtype, GatedForward, GatedGrads, GatedOptions, GatedRecurrentBackend,
    GatedTensors,
};
use crate::FlaError;

#[derive(Debug)]
struct GatedRecurrentBackward;

#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    x: GatedTensors<B>,
    o: FloatTensor<B>,
    ht: Option<FloatTensor<B>>,
    opts: GatedOptions,
    o_shape: Shape,
}

impl<B: GatedRecurrentBackend> Backward<B, 6> for GatedRecurrentBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _c: &mut Checkpointer) {
        let s = ops.state;
        let packed = grads.consume::<B>(&ops.node);
        let dtype = s.x.q.dtype();
        let (d_o, d_ht) = match &s.ht {
            None => (packed, None),
            Some(ht) => {
                let n_o = s.o_shape.num_elements();
                let n_h = ht.shape().num_elements();
                let d_o = B::float_slice(packed.clone(), &[Slice::from(0..n_o)]);
                let d_o =
                    B::float_cast(B::float_reshape(d_o, s.o_shape.clone()), float_dtype(dtype));
                let d_h = B::float_slice(packed, &[Slice::from(n_o..n_o + n_h)]);
                (d_o, Some(B::float_reshape(d_h, ht.shape())))
            }
        };
        let g = B::gated_recurrent_backward(s.x, s.o, s.ht, d_o, d_ht, &s.opts)
            .expect("the forward validated these inputs");
        let computed = [Some(g.dq), Some(g.dk), Some(g.dv), g.dg, g.dgv, g.dh0];
        for (node, grad) in ops.parents.into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: GatedRecurrentBackend, C: CheckpointStrategy> GatedRecurrentBackend for Autodiff<B, C> {
    fn gated_recurrent_forward(
        x: GatedTensors<Self>,
        opts: &GatedOptions,
    ) -> Result<GatedForward<Self>, FlaError> {
        describe(&x, opts)?;
        // Absent optional inputs take the place of an untracked constant, which gets no gradient.
        let device = Self::float_device(&x.q);
        let absent = || Self::float_zeros([1].into(), &device, burn::tensor::FloatDType::F32);
        let nodes = [
            x.q.node.clone(),
            x.k.node.clone(),
            x.v.node.clone(),
            x.g.as_ref()
                .map(|t| t.node.clone())
                .unwrap_or_else(|| absent().node),
            x.gv.as_ref()
                .map(|t| t.node.clone())
                .unwrap_or_else(|| absent().node),
            x.h0.as_ref()
                .map(|t| t.node.clone())
                .unwrap_or_else(|| absent().node),
        ];
        let inner = inner(&x);
        let out = B::gated_recurrent_forward(inner.clone(), opts)?;
        let o_shape = out.o.shape();
        let dtype = out.o.dtype();

        // The node's single output: o alone, or o and hT packed flat in f32.
        let output = match &out.ht {
            None => out.o.clone(),
            Some(ht) => {
                let o_flat = B::float_reshape(
                    B::float_cast(out.o.clone(), burn::tensor::FloatDType::F32),
                    [o_shape.num_elements()].into(),
                );
                let h_flat = B::float_reshape(ht.clone(), [ht.shape().num_elements()].into());
                B::float_cat(vec![o_flat, h_flat], 0)
            }
        };
        let node = match GatedRecurrentBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                Saved {
                    x: inner,
                    o: out.o.clone(),
                    ht: out.ht.clone(),
                    opts: opts.clone(),
                    o_shape: o_shape.clone(),
                },
                output,
            ),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        match out.ht {
            None => Ok(GatedForward { o: node, ht: None }),
            Some(ht) => {
                let n_o = o_shape.num_elements();
                let n_h = ht.shape().num_elements();
                let o = Self::float_slice(node.clone(), &[Slice::from(0..n_o)]);
                let o = Self::float_reshape(o, o_shape);
                let o = Self::float_cast(o, float_dtype(dtype));
                let h = Self::float_slice(node, &[Slice::from(n_o..n_o + n_h)]);
                Ok(GatedForward {
                    o,
                    ht: Some(Self::float_reshape(h, ht.shape())),
                })
            }
        }
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn gated_recurrent_backward(
        x: GatedTensors<Self>,
        o: FloatTensor<Self>,
        ht: Option<FloatTensor<Self>>,
        d_o: FloatTensor<Self>,
        d_ht: Option<FloatTensor<Self>>,
        opts: &GatedOptions,
    ) -> Result<GatedGrads<Self>, FlaError> {
        let inner = inner(&x);
        let g = B::gated_recurrent_backward(
            inner,
            o.primitive,
            ht.map(|t| t.primitive),
            d_o.primitive,
            d_ht.map(|t| t.primitive),
            opts,
        )?;
        let w = <Self as AutodiffBackend>::from_inner;
        Ok(GatedGrads {
            dq: w(g.dq),
            dk: w(g.dk),
            dv: w(g.dv),
            dg: g.dg.map(w),
            dgv: g.dgv.map(w),
            dh0: g.dh0.map(w),
        })
    }

    fn gated_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::gated_check_dtype(device, dtype)
    }
}

/// The inner backend's view of tracked inputs (primitives are reference-counted: cheap clones).
fn inner<B: GatedRecurrentBackend, C: CheckpointStrategy>(
    x: &GatedTensors<Autodiff<B, C>>,
) -> GatedTensors<B> {
    GatedTensors {
        q: x.q.primitive.clone(),
        k: x.k.primitive.clone(),
        v: x.v.primitive.clone(),
        g: x.g.as_ref().map(|t| t.primitive.clone()),
        gv: x.gv.as_ref().map(|t| t.primitive.clone()),
        h0: x.h0.as_ref().map(|t| t.primitive.clone()),
    }
}
