//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::cross_entropy::{
    cross_entropy_backward, cross_entropy_forward, CrossEntropyProblem,
};

use super::{describe, describe_backward, CrossEntropyBackend};
use crate::gated::cube::{empty, i32_ids};
use crate::gated::kernel_dtype;
use crate::FlaError;

/// Fills in the kernels' dtype of a validated problem and checks the device computes it.
fn on_device<R: CubeRuntime>(
    mut p: CrossEntropyProblem,
    logits: &CubeTensor<R>,
) -> Result<CrossEntropyProblem, FlaError> {
    p.dtype = kernel_dtype(logits.dtype())?;
    p.dtype.check_supported(&logits.client)?;
    Ok(p)
}

impl<R, F, I, BT> CrossEntropyBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn cross_entropy_forward(
        logits: CubeTensor<R>,
        targets: CubeTensor<R>,
    ) -> Result<(CubeTensor<R>, CubeTensor<R>), FlaError> {
        let p = on_device(describe::<Self>(&logits, &targets)?, &logits)?;
        // The kernels index flat row-major buffers.
        let (x, t) = (
            into_contiguous(logits),
            i32_ids::<R, F, I, BT>(targets, p.vocab),
        );
        let loss = empty(&x, vec![p.rows], DType::F32);
        let lse = empty(&x, vec![p.rows], DType::F32);
        cross_entropy_forward(
            &x.client,
            &p,
            [&x.handle, &t.handle],
            [&loss.handle, &lse.handle],
        )?;
        Ok((loss, lse))
    }

    fn cross_entropy_backward(
        logits: CubeTensor<R>,
        targets: CubeTensor<R>,
        lse: CubeTensor<R>,
        dloss: CubeTensor<R>,
    ) -> Result<CubeTensor<R>, FlaError> {
        let p = on_device(
            describe_backward::<Self>(&logits, &targets, &lse, &dloss)?,
            &logits,
        )?;
        let (x, t) = (
            into_contiguous(logits),
            i32_ids::<R, F, I, BT>(targets, p.vocab),
        );
        let (lse, dloss) = (into_contiguous(lse), into_contiguous(dloss));
        let dx = empty(&x, x.shape().to_vec(), x.dtype());
        cross_entropy_backward(
            &x.client,
            &p,
            [&x.handle, &t.handle, &lse.handle, &dloss.handle],
            &dx.handle,
        )?;
        Ok(dx)
    }

    fn cross_entropy_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }
}
