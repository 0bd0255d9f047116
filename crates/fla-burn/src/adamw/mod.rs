//! One AdamW step on one parameter tensor, fused, as a Burn backend extension; and
//! [`FusedAdamW`], Burn's `AdamW` optimiser with each step that one op. See
//! `fla_cubecl_kernels::adamw` for the math (Burn's, with its per-tensor gradient clipping).
//!
//! The op runs on the backend the optimiser runs on (an `Autodiff` backend's inner backend), so
//! it has no `Autodiff` implementation: optimiser steps are not differentiated.

mod cube;
mod fusion;
mod optim;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};
use fla_cubecl_kernels::adamw::AdamWProblem;
use fla_cubecl_kernels::adamw::GLOBAL_NORM_EPS;
pub use fla_cubecl_kernels::adamw::{AdamWStep, GradClip};
use fla_cubecl_kernels::{FloatDType, KernelError};

use crate::checks::{expect_tensor, shared_float_dtype};
use crate::gated::float_dtype;
use crate::FlaError;

pub use optim::{FusedAdamW, FusedAdamWConfig, FusedAdamWOptimizer, ScaleSlot};

/// A parameter's AdamW moments `(m, v)`, each shaped like it.
pub type Moments<B> = (FloatTensor<B>, FloatTensor<B>);

/// Backend extension for the fused AdamW step.
///
/// The default method computes through plain tensor ops (any backend); `CubeBackend` and
/// `Fusion<CubeBackend>` override it with the fused kernels, which update the parameter and the
/// moments in place where no other tensor shares their buffers.
pub trait AdamWBackend: Backend {
    /// One AdamW step: `(param, m, v)` after it, from `param`, its gradient `grad` (same shape
    /// and dtype) and the previous steps' moments (`None` on the first step, `s.time == 1`).
    /// The inputs are consumed.
    ///
    /// Errors: [`FlaError::Shape`] or [`FlaError::DType`] where the tensors disagree,
    /// [`FlaError::Empty`] for a zero-length parameter, [`FlaError::Unsupported`] for a step
    /// count or hyperparameter out of range (`time` 0, or above 1 without moments; a β outside
    /// `[0, 1)`; a non-finite learning rate, ε or decay; a clipping threshold not positive and
    /// finite), [`FlaError::UnsupportedDType`] where the device cannot compute the dtype,
    /// [`FlaError::Kernel`] on the fused backends for a tensor of more than 2³¹ entries.
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<Moments<Self>>,
        s: &AdamWStep,
    ) -> Result<[FloatTensor<Self>; 3], FlaError> {
        describe::<Self>(&param, &grad, moments.as_ref(), s)?;
        Ok(tensor_step::<Self>(param, grad, moments, s, None))
    }

    /// [`Self::adamw_step`] with the gradient multiplied by `scale` (one `f32` entry, on the
    /// device) in place of the step's own clipping, which must be none: clipping by the global
    /// norm of all gradients, whose coefficient the caller computed over all of them first.
    ///
    /// Errors: as [`Self::adamw_step`]; [`FlaError::Shape`] or [`FlaError::DType`] for a
    /// scale that is not one `f32`, [`FlaError::Unsupported`] beside the step's own clipping.
    fn adamw_step_scaled(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<Moments<Self>>,
        s: &AdamWStep,
        scale: FloatTensor<Self>,
    ) -> Result<[FloatTensor<Self>; 3], FlaError> {
        describe::<Self>(&param, &grad, moments.as_ref(), s)?;
        check_scale::<Self>(&scale, s)?;
        Ok(tensor_step::<Self>(param, grad, moments, s, Some(scale)))
    }

    /// The coefficient of clipping by the global norm of `grads` (all of a step's gradients,
    /// one float dtype): `min(1, max_norm / (‖g‖ + 1e-6))`, `‖g‖` the L2 norm of all of them
    /// together (PyTorch's `clip_grad_norm_`), as one `f32` on the device, for
    /// [`Self::adamw_step_scaled`]. The default sums through tensor ops in `f32`; the fused
    /// backends launch one reduction per gradient into one buffer of partial sums, and one
    /// more for the coefficient.
    ///
    /// Errors: [`FlaError::Empty`] for no gradients or a zero-length one, [`FlaError::DType`]
    /// where their dtypes differ, [`FlaError::Unsupported`] for a threshold not positive and
    /// finite.
    fn global_clip_coefficient(
        grads: Vec<FloatTensor<Self>>,
        max_norm: f32,
    ) -> Result<FloatTensor<Self>, FlaError> {
        check_global::<Self>(&grads, max_norm)?;
        let mut total: Option<Tensor<Self, 1>> = None;
        for g in grads {
            let n = g.shape().num_elements();
            let g = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(Self::float_reshape(
                g,
                [n].into(),
            )));
            let sum = g.cast(burn::tensor::FloatDType::F32).square().sum();
            total = Some(match total {
                Some(t) => t + sum,
                None => sum,
            });
        }
        let norm = total.expect("checked: at least one gradient").sqrt();
        // A division, not `recip`: NdArray's reciprocal is approximate.
        let coef = (norm.full_like(max_norm) / norm.add_scalar(GLOBAL_NORM_EPS)).clamp_max(1.0);
        Ok(coef.into_primitive().tensor())
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn adamw_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }
}

/// [`AdamWBackend::adamw_step`] on `Tensor`s of any rank: `(param, m, v)` after the step.
pub fn adamw_step<B: AdamWBackend, const D: usize>(
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    s: &AdamWStep,
) -> Result<[Tensor<B, D>; 3], FlaError> {
    let prim = |t: Tensor<B, D>| t.into_primitive().tensor();
    let out = B::adamw_step(
        prim(param),
        prim(grad),
        moments.map(|(m, v)| (prim(m), prim(v))),
        s,
    )?;
    Ok(out.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t))))
}

/// The step through tensor ops, unchecked: the default implementation, and what
/// [`FusedAdamW`] falls back to where the fused op refuses a tensor (an empty one, or a dtype
/// the device's kernels lack). Computes in `f32` (`f64` for `f64` tensors), writes the
/// parameter's dtype.
pub(crate) fn tensor_step<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moments: Option<Moments<B>>,
    s: &AdamWStep,
    scale: Option<FloatTensor<B>>,
) -> [FloatTensor<B>; 3] {
    let (dtype, shape) = (param.dtype(), param.shape());
    let wide = match dtype {
        DType::F64 => burn::tensor::FloatDType::F64,
        _ => burn::tensor::FloatDType::F32,
    };
    let n = shape.num_elements();
    let t = |x: FloatTensor<B>| {
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(x, [n].into())))
            .cast(wide)
    };
    let (p, mut g) = (t(param), t(grad));
    if let Some(c) = scale {
        g = g * Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(c)).cast(wide);
    }
    match s.clip {
        None => {}
        Some(GradClip::Value(c)) => {
            let (above, below) = (g.clone().greater_elem(c), g.clone().lower_elem(-c));
            g = g.mask_fill(above, c).mask_fill(below, -c);
        }
        Some(GradClip::Norm(c)) => {
            // What Burn adds to the norm: the dtype's smallest positive normal.
            let tiny = match dtype {
                DType::F64 => f64::MIN_POSITIVE,
                DType::F16 => fla_cubecl_kernels::adamw::min_positive(FloatDType::F16) as f64,
                _ => f32::MIN_POSITIVE as f64,
            };
            let norm = g.clone().square().sum().sqrt();
            // A division, not `recip`: NdArray's reciprocal is approximate.
            let coef = (norm.full_like(c) / norm.add_scalar(tiny)).clamp_max(1.0);
            g = g * coef;
        }
    }
    let (b1, b2) = (s.beta_1 as f64, s.beta_2 as f64);
    let mut m = g.clone() * (1.0 - b1);
    let mut v = g.square() * (1.0 - b2);
    if let Some((m0, v0)) = moments {
        m = m + t(m0) * b1;
        v = v + t(v0) * b2;
    }
    let time = s.time.min(i32::MAX as usize) as i32;
    let (c1, c2) = (1.0 - b1.powi(time), 1.0 - b2.powi(time));
    let delta = (m.clone() / c1) / ((v.clone() / c2).sqrt() + s.epsilon as f64);
    let decay = s.lr * s.weight_decay as f64;
    let kept = if s.cautious_weight_decay {
        let differ = p
            .clone()
            .greater_equal_elem(0.0)
            .not_equal(m.clone().greater_equal_elem(0.0));
        p.clone() - (p.clone() * decay).mask_fill(differ, 0.0)
    } else {
        p * (1.0 - decay)
    };
    let p = kept - delta * s.lr;
    let back = |x: Tensor<B, 1>| {
        B::float_reshape(
            x.cast(float_dtype(dtype)).into_primitive().tensor(),
            shape.clone(),
        )
    };
    [back(p), back(m), back(v)]
}

/// Checks that the gradient and the moments have the parameter's shape and float dtype;
/// returns the shape. What the fused op and [`FusedAdamW`]'s tensor-op fallback both require.
pub(crate) fn check_operands<B: Backend>(
    param: &FloatTensor<B>,
    grad: &FloatTensor<B>,
    moments: Option<&Moments<B>>,
) -> Result<Vec<usize>, FlaError> {
    let dtype = shared_float_dtype(("param", param), &[("grad", Some(grad))])?;
    let shape = param.shape().to_vec();
    expect_tensor("grad", grad, &shape, dtype)?;
    if let Some((m, v)) = moments {
        expect_tensor("moment m", m, &shape, dtype)?;
        expect_tensor("moment v", v, &shape, dtype)?;
    }
    Ok(shape)
}

/// Validates the tensors against each other and the step's options, and describes the call
/// (dtype `f32` until a fused backend fills it in).
pub(crate) fn describe<B: Backend>(
    param: &FloatTensor<B>,
    grad: &FloatTensor<B>,
    moments: Option<&Moments<B>>,
    s: &AdamWStep,
) -> Result<AdamWProblem, FlaError> {
    let shape = check_operands::<B>(param, grad, moments)?;
    let p = AdamWProblem {
        len: shape.iter().product(),
        dtype: FloatDType::F32,
        has_state: moments.is_some(),
    };
    if p.len == 0 {
        return Err(FlaError::Empty(format!(
            "a zero-length parameter {shape:?} in the AdamW step"
        )));
    }
    p.validate()?;
    check_step(s, p.has_state)?;
    Ok(p)
}

/// Checks the gradients and threshold of [`AdamWBackend::global_clip_coefficient`]; returns
/// their dtype.
pub(crate) fn check_global<B: Backend>(
    grads: &[FloatTensor<B>],
    max_norm: f32,
) -> Result<DType, FlaError> {
    let Some(first) = grads.first() else {
        return Err(FlaError::Empty(
            "no gradients for the global norm (zero-length list)".into(),
        ));
    };
    let dtype = first.dtype();
    for g in grads {
        if g.dtype() != dtype {
            return Err(FlaError::DType(format!(
                "the global norm's gradients must share one dtype, got {dtype:?} and {:?}",
                g.dtype()
            )));
        }
        if g.shape().num_elements() == 0 {
            return Err(FlaError::Empty(format!(
                "a zero-length gradient {:?} in the global norm",
                g.shape().to_vec()
            )));
        }
    }
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(FlaError::Unsupported(format!(
            "clipping by the global norm needs a positive finite threshold, got {max_norm}"
        )));
    }
    Ok(dtype)
}

/// Checks the scale of [`AdamWBackend::adamw_step_scaled`]: one `f32` entry, and no clipping
/// of the step's own beside it.
pub(crate) fn check_scale<B: Backend>(
    scale: &FloatTensor<B>,
    s: &AdamWStep,
) -> Result<(), FlaError> {
    if scale.shape().num_elements() != 1 {
        return Err(FlaError::Shape(format!(
            "the AdamW step's gradient scale must be one entry, got shape {:?}",
            scale.shape().to_vec()
        )));
    }
    if scale.dtype() != DType::F32 {
        return Err(FlaError::DType(format!(
            "the AdamW step's gradient scale must be f32, got {:?}",
            scale.dtype()
        )));
    }
    if s.clip.is_some() {
        return Err(FlaError::Unsupported(
            "a scaled AdamW step clips by its scale alone: the step's own clipping must be none"
                .into(),
        ));
    }
    Ok(())
}

/// [`AdamWStep::validate`] with its refusals as [`FlaError::Unsupported`] (an option out of
/// range, not a shape).
pub(crate) fn check_step(s: &AdamWStep, has_state: bool) -> Result<(), FlaError> {
    s.validate(has_state).map_err(|e| match e {
        KernelError::InvalidProblem(msg) => FlaError::Unsupported(msg),
        other => other.into(),
    })
}

tensor_op_impl!(AdamWBackend);
