//! `Autodiff<B>`: the product on the inner backend, recorded as one graph node whose backward is
//! two more products (`crate::recorded::autodiff`); the node keeps `a` and `b`.

use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;

use super::{describe, MatmulBackend, MatmulOp};
use crate::recorded::autodiff;
use crate::FlaError;

impl<B: MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn matmul_forward(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        describe::<Self>(&a, &b)?;
        let x = [Some(a), Some(b), None, None, None, None];
        Ok(autodiff::forward::<B, C, _>(&MatmulOp, x)?.o)
    }

    fn matmul_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::matmul_check_dtype(device, dtype)
    }
}
