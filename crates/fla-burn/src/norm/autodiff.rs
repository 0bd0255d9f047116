//! `Autodiff<B>`: the forward on the inner backend, recorded as one graph node whose backward is
//! the hand-derived one (`B::rms_norm_backward`), `rstd` saved in the node
//! (`crate::recorded::autodiff`).

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;

use super::{describe, NormBackend, NormForward, NormGrads, NormOpOptions, NormTensors};
use crate::recorded::{autodiff, Outputs};
use crate::FlaError;

impl<B: NormBackend, C: CheckpointStrategy> NormBackend for Autodiff<B, C> {
    /// Records the forward. The returned `rstd` is a constant: the node keeps it for its
    /// backward, and no gradient flows through it.
    fn rms_norm_forward(
        x: NormTensors<Self>,
        opts: &NormOpOptions,
    ) -> Result<NormForward<Self>, FlaError> {
        describe(&x, opts)?;
        let Outputs { o, ht, .. } = autodiff::forward::<B, C, _>(opts, x.into_inputs())?;
        let rstd = ht.ok_or_else(|| FlaError::Shape("the forward returned no rstd".into()))?;
        Ok(NormForward { y: o, rstd })
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn rms_norm_backward(
        x: NormTensors<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        opts: &NormOpOptions,
    ) -> Result<NormGrads<Self>, FlaError> {
        let inner = NormTensors::<B> {
            x: x.x.primitive,
            w: x.w.primitive,
            g: x.g.map(|g| g.primitive),
        };
        let g = B::rms_norm_backward(inner, rstd.primitive, dy.primitive, opts)?;
        let w = <Self as AutodiffBackend>::from_inner;
        Ok(NormGrads {
            dx: w(g.dx),
            dw: w(g.dw),
            dg: g.dg.map(w),
        })
    }

    fn norm_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::norm_check_dtype(device, dtype)
    }
}
