//! `Fusion<B>` (what `burn::backend::Wgpu` and `burn::backend::Cuda` are by default): the op is
//! registered in the fusion stream as a custom operation that runs the inner backend's kernels
//! when the stream executes (`crate::recorded::fusion`). Inputs are validated before
//! registration, so the deferred execution cannot fail on them.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, TensorMetadata};
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::{
    describe, describe_backward, kernel_dtype, GatedForward, GatedGrads, GatedOptions,
    GatedRecurrentBackend, GatedTensors,
};
use crate::recorded::{fusion, Outputs};
use crate::FlaError;
use fla_cubecl_kernels::gated::GatedProblem;

impl<B: FusionBackend + GatedRecurrentBackend> GatedRecurrentBackend for Fusion<B> {
    fn gated_recurrent_forward(
        x: GatedTensors<Self>,
        opts: &GatedOptions,
    ) -> Result<GatedForward<Self>, FlaError> {
        let p = describe(&x, opts)?;
        B::gated_check_dtype(&Self::float_device(&x.q), x.q.dtype())?;
        B::gated_check_device(&Self::float_device(&x.q), &p)?;
        let o = vec![p.batch, p.seq_len, p.heads, p.v_dim];
        let ht = p
            .output_final_state
            .then(|| vec![p.num_seqs(), p.heads, p.k_dim, p.v_dim]);
        // The tiling, and so the scores' chunk, depends on the dtype (checked above).
        let p = GatedProblem {
            dtype: kernel_dtype(x.q.dtype())?,
            ..p
        };
        let scores = B::gated_scores_shape(&Self::float_device(&x.q), &p, opts).map(Vec::from);
        let Outputs { o, ht, aux } =
            fusion::forward_keeping::<B, _>(opts, x.into_inputs(), o, ht, scores);
        Ok(GatedForward { o, ht, scores: aux })
    }

    fn gated_recurrent_backward(
        x: GatedTensors<Self>,
        o: FusionTensor<B::FusionRuntime>,
        ht: Option<FusionTensor<B::FusionRuntime>>,
        scores: Option<FusionTensor<B::FusionRuntime>>,
        d_o: FusionTensor<B::FusionRuntime>,
        d_ht: Option<FusionTensor<B::FusionRuntime>>,
        opts: &GatedOptions,
    ) -> Result<GatedGrads<Self>, FlaError> {
        let p = describe_backward(&x, &o, ht.as_ref(), &d_o, d_ht.as_ref(), opts)?;
        B::gated_check_dtype(&Self::float_device(&x.q), x.q.dtype())?;
        B::gated_check_device(&Self::float_device(&x.q), &p)?;
        let out = Outputs { o, ht, aux: scores };
        let grads = fusion::backward::<B, _>(opts, x.into_inputs(), Some(out), d_o, d_ht);
        Ok(GatedGrads::from_inputs(grads))
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
