//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::swiglu::{swiglu_backward, swiglu_forward, SwigluProblem};

use super::{describe, describe_backward, SwigluBackend};
use crate::gated::cube::empty;
use crate::gated::kernel_dtype;
use crate::FlaError;

/// Fills in the kernels' dtype of a validated problem and checks the device computes it.
fn on_device<R: CubeRuntime>(
    mut p: SwigluProblem,
    g: &CubeTensor<R>,
) -> Result<SwigluProblem, FlaError> {
    p.dtype = kernel_dtype(g.dtype())?;
    p.dtype.check_supported(&g.client)?;
    Ok(p)
}

impl<R, F, I, BT> SwigluBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn swiglu_forward(g: CubeTensor<R>, u: CubeTensor<R>) -> Result<CubeTensor<R>, FlaError> {
        let p = on_device(describe::<Self>(&g, &u)?, &g)?;
        // The kernels index flat row-major buffers.
        let (g, u) = (into_contiguous(g), into_contiguous(u));
        let y = empty(&g, g.shape().to_vec(), g.dtype());
        swiglu_forward(&g.client, &p, &g.handle, &u.handle, &y.handle)?;
        Ok(y)
    }

    fn swiglu_backward(
        g: CubeTensor<R>,
        u: CubeTensor<R>,
        dy: CubeTensor<R>,
    ) -> Result<(CubeTensor<R>, CubeTensor<R>), FlaError> {
        let p = on_device(describe_backward::<Self>(&g, &u, &dy)?, &g)?;
        let (g, u, dy) = (into_contiguous(g), into_contiguous(u), into_contiguous(dy));
        let dg = empty(&g, g.shape().to_vec(), g.dtype());
        let du = empty(&g, u.shape().to_vec(), u.dtype());
        swiglu_backward(
            &g.client,
            &p,
            [&g.handle, &u.handle, &dy.handle],
            [&dg.handle, &du.handle],
        )?;
        Ok((dg, du))
    }

    fn swiglu_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }
}
