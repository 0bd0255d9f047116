//! `Autodiff<B>`: the forward on the inner backend, recorded as one graph node whose backward is
//! the hand-derived one (`B::delta_rule_backward`); see `crate::recorded::autodiff`.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;

use super::{describe, DeltaForward, DeltaGrads, DeltaOptions, DeltaRuleBackend, DeltaTensors};
use crate::recorded::{autodiff, Outputs};
use crate::FlaError;
use fla_cubecl_kernels::delta::DeltaProblem;

impl<B: DeltaRuleBackend, C: CheckpointStrategy> DeltaRuleBackend for Autodiff<B, C> {
    fn delta_rule_forward(
        x: DeltaTensors<Self>,
        opts: &DeltaOptions,
    ) -> Result<DeltaForward<Self>, FlaError> {
        describe(&x, opts)?;
        let Outputs { o, ht, .. } = autodiff::forward::<B, C, _>(opts, x.into_inputs())?;
        Ok(DeltaForward { o, ht })
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn delta_rule_backward(
        x: DeltaTensors<Self>,
        d_o: FloatTensor<Self>,
        d_ht: Option<FloatTensor<Self>>,
        opts: &DeltaOptions,
    ) -> Result<DeltaGrads<Self>, FlaError> {
        let inner = DeltaTensors::from_inputs(x.into_inputs().map(|t| t.map(|t| t.primitive)));
        let g = B::delta_rule_backward(inner, d_o.primitive, d_ht.map(|t| t.primitive), opts)?;
        let w = <Self as AutodiffBackend>::from_inner;
        Ok(DeltaGrads::from_inputs(g.into_inputs().map(|t| t.map(w))))
    }

    fn delta_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::delta_check_dtype(device, dtype)
    }

    fn delta_check_device(device: &Self::Device, problem: &DeltaProblem) -> Result<(), FlaError> {
        B::delta_check_device(device, problem)
    }
}
