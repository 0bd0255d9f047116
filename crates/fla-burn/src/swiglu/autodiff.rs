//! `Autodiff<B>`: the forward on the inner backend, recorded as one graph node whose backward is
//! the hand-derived one (`B::swiglu_backward`); the node keeps `g`, `u` and `y`, no intermediate
//! (`crate::recorded::autodiff`).

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;

use super::{describe, SwigluBackend, SwigluOp};
use crate::recorded::autodiff;
use crate::FlaError;

impl<B: SwigluBackend, C: CheckpointStrategy> SwigluBackend for Autodiff<B, C> {
    fn swiglu_forward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        describe::<Self>(&g, &u)?;
        let x = [Some(g), Some(u), None, None, None, None];
        Ok(autodiff::forward::<B, C, _>(&SwigluOp, x)?.o)
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn swiglu_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> Result<(FloatTensor<Self>, FloatTensor<Self>), FlaError> {
        let (dg, du) = B::swiglu_backward(g.primitive, u.primitive, dy.primitive)?;
        let w = <Self as AutodiffBackend>::from_inner;
        Ok((w(dg), w(du)))
    }

    fn swiglu_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::swiglu_check_dtype(device, dtype)
    }
}
