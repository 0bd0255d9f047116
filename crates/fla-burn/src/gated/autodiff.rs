//! `Autodiff<B>`: the forward on the inner backend, recorded as one graph node whose backward is
//! the hand-derived one (`B::gated_recurrent_backward`); see `crate::recorded::autodiff`.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;

use super::{
    describe, GatedForward, GatedGrads, GatedOptions, GatedRecurrentBackend, GatedTensors,
};
use crate::recorded::{autodiff, Outputs};
use crate::FlaError;
use fla_cubecl_kernels::gated::GatedProblem;

impl<B: GatedRecurrentBackend, C: CheckpointStrategy> GatedRecurrentBackend for Autodiff<B, C> {
    fn gated_recurrent_forward(
        x: GatedTensors<Self>,
        opts: &GatedOptions,
    ) -> Result<GatedForward<Self>, FlaError> {
        describe(&x, opts)?;
        let Outputs { o, ht, .. } = autodiff::forward::<B, C, _>(opts, x.into_inputs())?;
        Ok(GatedForward {
            o,
            ht,
            scores: None,
        })
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn gated_recurrent_backward(
        x: GatedTensors<Self>,
        o: FloatTensor<Self>,
        ht: Option<FloatTensor<Self>>,
        scores: Option<FloatTensor<Self>>,
        d_o: FloatTensor<Self>,
        d_ht: Option<FloatTensor<Self>>,
        opts: &GatedOptions,
    ) -> Result<GatedGrads<Self>, FlaError> {
        let inner = GatedTensors::from_inputs(x.into_inputs().map(|t| t.map(|t| t.primitive)));
        let g = B::gated_recurrent_backward(
            inner,
            o.primitive,
            ht.map(|t| t.primitive),
            scores.map(|t| t.primitive),
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

    fn gated_check_device(device: &Self::Device, problem: &GatedProblem) -> Result<(), FlaError> {
        B::gated_check_device(device, problem)
    }

    fn gated_scores_shape(
        device: &Self::Device,
        problem: &GatedProblem,
        opts: &GatedOptions,
    ) -> Option<[usize; 3]> {
        B::gated_scores_shape(device, problem, opts)
    }
}
