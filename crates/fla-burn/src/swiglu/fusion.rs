//! `Fusion<B>`: the op registered in the fusion stream as a custom operation
//! (`crate::recorded::fusion`), validated before registration.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::DType;
use burn::tensor::TensorMetadata;
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::{describe, describe_backward, SwigluBackend, SwigluOp};
use crate::recorded::fusion;
use crate::FlaError;

type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

impl<B: FusionBackend + SwigluBackend> SwigluBackend for Fusion<B> {
    fn swiglu_forward(g: FTensor<B>, u: FTensor<B>) -> Result<FTensor<B>, FlaError> {
        describe::<Self>(&g, &u)?;
        B::swiglu_check_dtype(&Self::float_device(&g), g.dtype())?;
        let y = g.shape().to_vec();
        let x = [Some(g), Some(u), None, None, None, None];
        Ok(fusion::forward::<B, _>(&SwigluOp, x, y, None).o)
    }

    fn swiglu_backward(
        g: FTensor<B>,
        u: FTensor<B>,
        dy: FTensor<B>,
    ) -> Result<(FTensor<B>, FTensor<B>), FlaError> {
        describe_backward::<Self>(&g, &u, &dy)?;
        B::swiglu_check_dtype(&Self::float_device(&g), g.dtype())?;
        let x = [Some(g), Some(u), None, None, None, None];
        let [dg, du, ..] = fusion::backward::<B, _>(&SwigluOp, x, None, dy, None);
        Ok((dg.expect("registered dg"), du.expect("registered du")))
    }

    fn swiglu_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::swiglu_check_dtype(device, dtype)
    }
}
