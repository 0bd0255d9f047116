//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`, updating the
//! parameter and the moments in place where no other tensor shares their buffers.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::adamw::adamw_step;

use super::{describe, AdamWBackend, AdamWStep, Moments};
use crate::gated::cube::empty;
use crate::gated::kernel_dtype;
use crate::FlaError;

/// `t` in a contiguous buffer the kernel may overwrite: `t` itself when nothing else holds it,
/// a copy otherwise (the caller's other tensors keep their values). burn-train's `Learner`
/// steps a clone of its model while holding the original, so there every parameter is copied
/// (one kernel each; measured on the tiny GLA preset) and only the moments update in place.
fn writable<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    let t = into_contiguous(t);
    if t.can_mut() {
        t
    } else {
        into_contiguous(t.copy())
    }
}

impl<R, F, I, BT> AdamWBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn adamw_step(
        param: CubeTensor<R>,
        grad: CubeTensor<R>,
        moments: Option<Moments<Self>>,
        s: &AdamWStep,
    ) -> Result<[CubeTensor<R>; 3], FlaError> {
        let mut p = describe::<Self>(&param, &grad, moments.as_ref(), s)?;
        p.dtype = kernel_dtype(param.dtype())?;
        p.dtype.check_supported(&param.client)?;
        let grad = into_contiguous(grad);
        let param = writable(param);
        let (m, v) = match moments {
            Some((m, v)) => (writable(m), writable(v)),
            None => {
                let shape = param.shape().to_vec();
                (
                    empty(&param, shape.clone(), param.dtype()),
                    empty(&param, shape, param.dtype()),
                )
            }
        };
        adamw_step(
            &param.client,
            &p,
            s,
            &grad.handle,
            [&param.handle, &m.handle, &v.handle],
        )?;
        Ok([param, m, v])
    }

    fn adamw_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }
}
