//! `Fusion<B>`: the op registered in the fusion stream as a custom operation
//! (`crate::recorded::fusion`), validated before registration.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::DType;
use burn::tensor::TensorMetadata;
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::{
    describe, describe_backward, NormBackend, NormForward, NormGrads, NormOpOptions, NormTensors,
};
use crate::recorded::{fusion, Outputs};
use crate::FlaError;

impl<B: FusionBackend + NormBackend> NormBackend for Fusion<B> {
    fn rms_norm_forward(
        x: NormTensors<Self>,
        opts: &NormOpOptions,
    ) -> Result<NormForward<Self>, FlaError> {
        let p = describe(&x, opts)?;
        B::norm_check_dtype(&Self::float_device(&x.x), x.x.dtype())?;
        let y = x.x.shape().to_vec();
        let Outputs { o, ht, .. } =
            fusion::forward::<B, _>(opts, x.into_inputs(), y, Some(vec![p.rows]));
        Ok(NormForward {
            y: o,
            rstd: ht.expect("registered rstd"),
        })
    }

    fn rms_norm_backward(
        x: NormTensors<Self>,
        rstd: FusionTensor<B::FusionRuntime>,
        dy: FusionTensor<B::FusionRuntime>,
        opts: &NormOpOptions,
    ) -> Result<NormGrads<Self>, FlaError> {
        describe_backward(&x, &rstd, &dy, opts)?;
        B::norm_check_dtype(&Self::float_device(&x.x), x.x.dtype())?;
        // The op's backward reads rstd alone; y travels with it as the recorded outputs' first
        // entry (the wrappers' convention), and the kernels never read it.
        let out = Outputs {
            o: dy.clone(),
            ht: Some(rstd),
            aux: None,
        };
        let g = fusion::backward::<B, _>(opts, x.into_inputs(), Some(out), dy, None);
        let x = NormTensors::<Self>::from_inputs(g);
        Ok(NormGrads {
            dx: x.x,
            dw: x.w,
            dg: x.g,
        })
    }

    fn norm_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::norm_check_dtype(device, dtype)
    }
}
