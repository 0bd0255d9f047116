//! RMSNorm over the last axis, optionally followed by a swish gate, fused, as a Burn backend
//! extension: what FLA's `RMSNorm` and `FusedRMSNormGated` (`activation="swish"`) compute, in
//! `f32` whatever the inputs' dtype. See `fla_cubecl_kernels::norm` for the math.
//!
//! Every model of `fla-models` runs two of these per layer and most token mixers a gated one;
//! through Burn's tensor ops each is about eight kernels forward and as many backward.

mod api;
mod autodiff;
mod cube;
mod fallback;
mod fusion;

pub use api::{rms_norm, rms_norm_gated};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use fla_cubecl_kernels::norm::NormProblem;
use fla_cubecl_kernels::FloatDType;

use crate::checks::{expect_tensor, shared_float_dtype};
use crate::recorded::{Inputs, Outputs, StateOp};
use crate::FlaError;

/// The primitive inputs of one call: `x: [..., D]`, the weight `w: [D]` and, gated, `g` shaped
/// like `x`; one float dtype.
#[derive(Debug, Clone)]
pub struct NormTensors<B: Backend> {
    pub x: FloatTensor<B>,
    pub w: FloatTensor<B>,
    pub g: Option<FloatTensor<B>>,
}

impl<B: Backend> NormTensors<B> {
    pub(crate) fn into_inputs(self) -> Inputs<B> {
        [Some(self.x), Some(self.w), self.g, None, None, None]
    }

    pub(crate) fn from_inputs([x, w, g, ..]: Inputs<B>) -> Self {
        Self {
            x: x.expect("x is always present"),
            w: w.expect("w is always present"),
            g,
        }
    }
}

/// Options of one call.
#[derive(Debug, Clone, PartialEq)]
pub struct NormOpOptions {
    /// Added to each row's mean square.
    pub eps: f32,
}

/// Forward results: `y` shaped like `x` in its dtype, and the reciprocal RMS of each row
/// `rstd: [rows]` in `f32` (what the backward reads; rows are every axis of `x` but the last,
/// flattened).
#[derive(Debug)]
pub struct NormForward<B: Backend> {
    pub y: FloatTensor<B>,
    pub rstd: FloatTensor<B>,
}

/// Gradients, each in the shape and dtype of its input.
#[derive(Debug)]
pub struct NormGrads<B: Backend> {
    pub dx: FloatTensor<B>,
    pub dw: FloatTensor<B>,
    pub dg: Option<FloatTensor<B>>,
}

/// Backend extension for the fused RMSNorm.
///
/// The default methods compute through plain tensor ops (any backend); `CubeBackend` and
/// `Fusion<CubeBackend>` override them with the fused kernels, and `Autodiff<B>` records the
/// forward with its hand-derived backward.
pub trait NormBackend: Backend {
    /// Errors: [`FlaError::Shape`] for a weight that is not `[D]`, a gate not shaped like `x`,
    /// `eps` negative or not finite, or `D` above 32768 (`fla_cubecl_kernels::norm::MAX_NORM_DIM`,
    /// the widest row the kernels hold in registers; every implementation refuses it alike),
    /// [`FlaError::DType`] for mixed or non-float dtypes, [`FlaError::Empty`] for zero-length
    /// input, [`FlaError::UnsupportedDType`] where the device cannot compute the dtype.
    fn rms_norm_forward(
        x: NormTensors<Self>,
        opts: &NormOpOptions,
    ) -> Result<NormForward<Self>, FlaError> {
        fallback::forward::<Self>(x, opts)
    }

    /// Gradients for `dy = ∂L/∂y`, given the forward's `rstd`. Same errors as the forward. Not
    /// itself differentiable.
    fn rms_norm_backward(
        x: NormTensors<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        opts: &NormOpOptions,
    ) -> Result<NormGrads<Self>, FlaError> {
        fallback::backward::<Self>(x, rstd, dy, opts)
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn norm_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }
}

/// How the `Autodiff` and `Fusion` wrappers run the norm on an inner backend: `rstd` travels as
/// the family's state output, saved for the backward only.
impl<B: NormBackend> StateOp<B> for NormOpOptions {
    const FORWARD: &'static str = "fla_rms_norm_forward";
    const BACKWARD: &'static str = "fla_rms_norm_backward";
    const READS_OUTPUTS: bool = true;
    const SAVED_HT: bool = true;

    fn forward(&self, x: Inputs<B>) -> Result<Outputs<B>, FlaError> {
        let out = B::rms_norm_forward(NormTensors::from_inputs(x), self)?;
        Ok(Outputs {
            o: out.y,
            ht: Some(out.rstd),
            aux: None,
        })
    }

    fn backward(
        &self,
        x: Inputs<B>,
        out: Option<Outputs<B>>,
        dy: FloatTensor<B>,
        _d_rstd: Option<FloatTensor<B>>,
    ) -> Result<Inputs<B>, FlaError> {
        let Some(Outputs { ht: Some(rstd), .. }) = out else {
            return Err(FlaError::Shape(
                "the norm's backward needs the forward's rstd".into(),
            ));
        };
        let g = B::rms_norm_backward(NormTensors::from_inputs(x), rstd, dy, self)?;
        Ok(NormTensors::<B> {
            x: g.dx,
            w: g.dw,
            g: g.dg,
        }
        .into_inputs())
    }
}

tensor_op_impl!(NormBackend);

/// Validates shapes, dtypes and `eps` against each other and describes the call (its dtype
/// `f32` until a fused backend fills it in).
pub(crate) fn describe<B: Backend>(
    x: &NormTensors<B>,
    opts: &NormOpOptions,
) -> Result<NormProblem, FlaError> {
    let xs = x.x.shape().to_vec();
    let Some(&dim) = xs.last() else {
        return Err(FlaError::Shape(
            "x must have at least one axis, the normalised one".into(),
        ));
    };
    shared_float_dtype(("x", &x.x), &[("w", Some(&x.w)), ("g", x.g.as_ref())])?;
    let dtype = x.x.dtype();
    expect_tensor("weight w", &x.w, &[dim], dtype)?;
    if let Some(g) = &x.g {
        expect_tensor("gate g", g, &xs, dtype)?;
    }
    let problem = NormProblem {
        rows: xs[..xs.len() - 1].iter().product(),
        dim,
        eps: opts.eps,
        gated: x.g.is_some(),
        dtype: FloatDType::F32,
    };
    problem.validate()?;
    Ok(problem)
}

/// Validates a backward call: the forward's inputs (as [`describe`]), its `rstd`, and `dy`.
pub(crate) fn describe_backward<B: Backend>(
    x: &NormTensors<B>,
    rstd: &FloatTensor<B>,
    dy: &FloatTensor<B>,
    opts: &NormOpOptions,
) -> Result<NormProblem, FlaError> {
    let p = describe(x, opts)?;
    expect_tensor("gradient dy", dy, &x.x.shape().to_vec(), x.x.dtype())?;
    expect_tensor("rstd", rstd, &[p.rows], DType::F32)?;
    Ok(p)
}
