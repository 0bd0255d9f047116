//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`, updating the
//! parameter and the moments in place where no other tensor shares their buffers, and writing
//! them to fresh buffers in the same pass where one does.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::adamw::{adamw_step, adamw_step_scaled, global_clip_coefficient, Slot};

use super::{check_global, check_scale, describe, AdamWBackend, AdamWStep, Moments};
use crate::gated::cube::empty;
use crate::gated::kernel_dtype;
use crate::FlaError;

/// `t` contiguous, and the tensor the step writes its result to: `t` itself when nothing else
/// holds its buffer, else a fresh one (the caller's other tensors keep their values).
/// burn-train's `Learner` steps a clone of its model while holding the original, so there
/// every parameter goes to a fresh buffer and only the moments update in place; the kernel
/// reads the old values and writes the new in one pass (a copy kernel per parameter tensor
/// before, 300 of them a step at FLA's 340M recipe).
/// `fresh` asks for a fresh buffer whatever `t`'s.
fn target<R: CubeRuntime>(t: CubeTensor<R>, fresh: bool) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    if !fresh && t.can_mut() {
        (t, None)
    } else {
        let fresh = empty(&t, t.shape().to_vec(), t.dtype());
        (t, Some(fresh))
    }
}

fn slot<'a, R: CubeRuntime>(t: &'a (CubeTensor<R>, Option<CubeTensor<R>>)) -> Slot<'a> {
    match t {
        (t, None) => Slot::InPlace(&t.handle),
        (t, Some(to)) => Slot::Into {
            from: &t.handle,
            to: &to.handle,
        },
    }
}

/// The tensor holding the result.
fn result<R: CubeRuntime>((t, fresh): (CubeTensor<R>, Option<CubeTensor<R>>)) -> CubeTensor<R> {
    fresh.unwrap_or(t)
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
        step::<R, F, I, BT>(param, grad, moments, s, None)
    }

    fn adamw_step_scaled(
        param: CubeTensor<R>,
        grad: CubeTensor<R>,
        moments: Option<Moments<Self>>,
        s: &AdamWStep,
        scale: CubeTensor<R>,
    ) -> Result<[CubeTensor<R>; 3], FlaError> {
        check_scale::<Self>(&scale, s)?;
        step::<R, F, I, BT>(param, grad, moments, s, Some(scale))
    }

    fn global_clip_coefficient(
        grads: Vec<CubeTensor<R>>,
        max_norm: f32,
    ) -> Result<CubeTensor<R>, FlaError> {
        let dtype = check_global::<Self>(&grads, max_norm)?;
        let grads: Vec<CubeTensor<R>> = grads.into_iter().map(into_contiguous).collect();
        let first = &grads[0];
        let bufs: Vec<_> = grads
            .iter()
            .map(|g| (&g.handle, g.shape().num_elements()))
            .collect();
        let handle = global_clip_coefficient(&first.client, &bufs, kernel_dtype(dtype)?, max_norm)?;
        Ok(CubeTensor::new_contiguous(
            first.client.clone(),
            first.device.clone(),
            Shape::new([1]),
            handle,
            DType::F32,
        ))
    }

    fn adamw_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }
}

/// Both steps: the kernels' [`adamw_step`], or [`adamw_step_scaled`] with a scale.
fn step<R, F, I, BT>(
    param: CubeTensor<R>,
    grad: CubeTensor<R>,
    moments: Option<(CubeTensor<R>, CubeTensor<R>)>,
    s: &AdamWStep,
    scale: Option<CubeTensor<R>>,
) -> Result<[CubeTensor<R>; 3], FlaError>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let mut p = describe::<CubeBackend<R, F, I, BT>>(&param, &grad, moments.as_ref(), s)?;
    p.dtype = kernel_dtype(param.dtype())?;
    p.dtype.check_supported(&param.client)?;
    let grad = into_contiguous(grad);
    let param = target(into_contiguous(param), false);
    let (m, v) = match moments {
        Some((m, v)) => {
            let (m, v) = (into_contiguous(m), into_contiguous(v));
            // The kernel takes both moments in place or neither: one shared buffer sends
            // both to fresh ones.
            let fresh = !(m.can_mut() && v.can_mut());
            (target(m, fresh), target(v, fresh))
        }
        None => {
            let shape = param.0.shape().to_vec();
            (
                (empty(&param.0, shape.clone(), param.0.dtype()), None),
                (empty(&param.0, shape, param.0.dtype()), None),
            )
        }
    };
    let client = &param.0.client;
    let slots = [slot(&param), slot(&m), slot(&v)];
    match scale.map(into_contiguous) {
        Some(c) => adamw_step_scaled(client, &p, s, &grad.handle, slots, &c.handle)?,
        None => adamw_step(client, &p, s, &grad.handle, slots)?,
    }
    Ok([result(param), result(m), result(v)])
}
