//! `Fusion<B>`: the op registered in the fusion stream as a custom operation
//! (`crate::recorded::fusion`), validated before registration.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, TensorMetadata};
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::{describe, MatmulBackend, MatmulOp};
use crate::recorded::fusion;
use crate::FlaError;

type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

impl<B: FusionBackend + MatmulBackend> MatmulBackend for Fusion<B> {
    fn matmul_forward(a: FTensor<B>, b: FTensor<B>) -> Result<FTensor<B>, FlaError> {
        let [m, _, n] = describe::<Self>(&a, &b)?;
        B::matmul_check_dtype(&Self::float_device(&a), a.dtype())?;
        let x = [Some(a), Some(b), None, None, None, None];
        Ok(fusion::forward::<B, _>(&MatmulOp, x, vec![m, n], None).o)
    }

    fn matmul_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::matmul_check_dtype(device, dtype)
    }
}
