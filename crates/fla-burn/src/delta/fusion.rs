//! `Fusion<B>`: the op registered in the fusion stream as a custom operation
//! (`crate::recorded::fusion`), validated before registration.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, TensorMetadata};
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::{
    describe, describe_backward, DeltaForward, DeltaGrads, DeltaOptions, DeltaRuleBackend,
    DeltaTensors,
};
use crate::recorded::{fusion, Outputs};
use crate::FlaError;
use fla_cubecl_kernels::delta::DeltaProblem;

impl<B: FusionBackend + DeltaRuleBackend> DeltaRuleBackend for Fusion<B> {
    fn delta_rule_forward(
        x: DeltaTensors<Self>,
        opts: &DeltaOptions,
    ) -> Result<DeltaForward<Self>, FlaError> {
        let p = describe(&x, opts)?;
        B::delta_check_dtype(&Self::float_device(&x.q), x.q.dtype())?;
        B::delta_check_device(&Self::float_device(&x.q), &p)?;
        let o = vec![p.batch, p.seq_len, p.v_heads, p.v_dim];
        let ht = p
            .output_final_state
            .then(|| vec![p.num_seqs(), p.v_heads, p.k_dim, p.v_dim]);
        let Outputs { o, ht, .. } = fusion::forward::<B, _>(opts, x.into_inputs(), o, ht);
        Ok(DeltaForward { o, ht })
    }

    fn delta_rule_backward(
        x: DeltaTensors<Self>,
        d_o: FusionTensor<B::FusionRuntime>,
        d_ht: Option<FusionTensor<B::FusionRuntime>>,
        opts: &DeltaOptions,
    ) -> Result<DeltaGrads<Self>, FlaError> {
        let p = describe_backward(&x, &d_o, d_ht.as_ref(), opts)?;
        B::delta_check_dtype(&Self::float_device(&x.q), x.q.dtype())?;
        B::delta_check_device(&Self::float_device(&x.q), &p)?;
        let grads = fusion::backward::<B, _>(opts, x.into_inputs(), None, d_o, d_ht);
        Ok(DeltaGrads::from_inputs(grads))
    }

    fn delta_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::delta_check_dtype(device, dtype)
    }

    fn delta_check_device(device: &Self::Device, problem: &DeltaProblem) -> Result<(), FlaError> {
        B::delta_check_device(device, problem)
    }
}
