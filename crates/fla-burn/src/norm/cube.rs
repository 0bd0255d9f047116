//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::norm::{
    norm_backward, norm_forward, NormBackwardBuffers, NormForwardBuffers, NormProblem,
};

use super::{
    describe, describe_backward, NormBackend, NormForward, NormGrads, NormOpOptions, NormTensors,
};
use crate::gated::cube::empty;
use crate::gated::kernel_dtype;
use crate::FlaError;

/// Fills in the kernels' dtype of a validated problem and checks the device computes it.
fn on_device<R: CubeRuntime>(
    mut p: NormProblem,
    x: &CubeTensor<R>,
) -> Result<NormProblem, FlaError> {
    p.dtype = kernel_dtype(x.dtype())?;
    p.dtype.check_supported(&x.client)?;
    Ok(p)
}

impl<R, F, I, BT> NormBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn rms_norm_forward(
        x: NormTensors<Self>,
        opts: &NormOpOptions,
    ) -> Result<NormForward<Self>, FlaError> {
        let p = on_device(describe(&x, opts)?, &x.x)?;
        // The kernels index flat row-major buffers.
        let (xs, w, g) = (
            into_contiguous(x.x),
            into_contiguous(x.w),
            x.g.map(into_contiguous),
        );
        let y = empty(&xs, xs.shape().to_vec(), xs.dtype());
        let rstd = empty(&xs, vec![p.rows], DType::F32);
        norm_forward(
            &xs.client,
            &p,
            NormForwardBuffers {
                x: &xs.handle,
                w: &w.handle,
                g: g.as_ref().map(|g| &g.handle),
                y: &y.handle,
                rstd: &rstd.handle,
            },
        )?;
        Ok(NormForward { y, rstd })
    }

    fn rms_norm_backward(
        x: NormTensors<Self>,
        rstd: CubeTensor<R>,
        dy: CubeTensor<R>,
        opts: &NormOpOptions,
    ) -> Result<NormGrads<Self>, FlaError> {
        let p = on_device(describe_backward(&x, &rstd, &dy, opts)?, &x.x)?;
        let (xs, w, g) = (
            into_contiguous(x.x),
            into_contiguous(x.w),
            x.g.map(into_contiguous),
        );
        let (rstd, dy) = (into_contiguous(rstd), into_contiguous(dy));
        let like = |t: &CubeTensor<R>| empty(&xs, t.shape().to_vec(), t.dtype());
        let grads = NormGrads::<Self> {
            dx: like(&xs),
            dw: like(&w),
            dg: g.as_ref().map(like),
        };
        norm_backward(
            &xs.client,
            &p,
            NormBackwardBuffers {
                x: &xs.handle,
                w: &w.handle,
                g: g.as_ref().map(|g| &g.handle),
                rstd: &rstd.handle,
                dy: &dy.handle,
                dx: &grads.dx.handle,
                dw: &grads.dw.handle,
                dg: grads.dg.as_ref().map(|g| &g.handle),
            },
        )?;
        Ok(grads)
    }

    fn norm_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }
}
