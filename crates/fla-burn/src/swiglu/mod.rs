//! SwiGLU's activation `swish(g) ∘ u`, fused, as a Burn backend extension (FLA's `swiglu`, the
//! middle of every `GatedMLP`). See `fla_cubecl_kernels::swiglu` for the math.

mod autodiff;
mod cube;
mod fusion;

use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};
use fla_cubecl_kernels::swiglu::SwigluProblem;
use fla_cubecl_kernels::FloatDType;

use crate::checks::{expect_tensor, shared_float_dtype};
use crate::gated::fallback::{unwrap, wrap};
use crate::recorded::{Inputs, Outputs, StateOp};
use crate::FlaError;

/// Backend extension for SwiGLU's fused activation.
///
/// The default methods compute through plain tensor ops (any backend); `CubeBackend` and
/// `Fusion<CubeBackend>` override them with the fused kernels, and `Autodiff<B>` records the
/// forward with its hand-derived backward (its node keeps `g`, `u` and `y`, which the MLP's next
/// matmul keeps anyway, and no intermediate).
pub trait SwigluBackend: Backend {
    /// `swish(g) ∘ u` for `g` and `u` of one shape and float dtype. Errors: [`FlaError::Shape`]
    /// for different shapes, [`FlaError::DType`] for mixed or non-float dtypes,
    /// [`FlaError::Empty`] for zero-length input, [`FlaError::UnsupportedDType`] where the device
    /// cannot compute the dtype.
    fn swiglu_forward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        describe::<Self>(&g, &u)?;
        let (dtype, shape) = (g.dtype(), g.shape());
        let (g, u) = (
            wrap::<Self, 1>(flat::<Self>(g)),
            wrap::<Self, 1>(flat::<Self>(u)),
        );
        let y = g.clone() * sigmoid(g) * u;
        Ok(Self::float_reshape(unwrap::<Self, 1>(y, dtype), shape))
    }

    /// `(dg, du)` for `dy` (shaped like `g`), each shaped like its input. Same errors as the forward. Not itself
    /// differentiable.
    fn swiglu_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> Result<(FloatTensor<Self>, FloatTensor<Self>), FlaError> {
        describe_backward::<Self>(&g, &u, &dy)?;
        let (dtype, shape) = (g.dtype(), g.shape());
        let t = |x: FloatTensor<Self>| wrap::<Self, 1>(flat::<Self>(x));
        let (g, u, dy) = (t(g), t(u), t(dy));
        let s = sigmoid(g.clone());
        // d(g σ(g))/dg = σ(g) (1 + g (1 − σ(g))).
        let dswish = s.clone() * (g.clone() * (s.clone().neg() + 1.0) + 1.0);
        let dg = dy.clone() * u * dswish;
        let du = dy * g * s;
        let back =
            |x: Tensor<Self, 1>| Self::float_reshape(unwrap::<Self, 1>(x, dtype), shape.clone());
        Ok((back(dg), back(du)))
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn swiglu_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }
}

/// `x` as one axis (the activation is element-wise).
fn flat<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let n = x.shape().num_elements();
    B::float_reshape(x, [n].into())
}

/// `swish(g) ∘ u`, fused on `CubeBackend` (CUDA, wgpu); differentiable in both under
/// `Autodiff`, whose node keeps `g`, `u` and `y` but neither `σ(g)` nor `swish(g)`. Shapes: `g` and `u` alike, any rank. Errors: see
/// [`SwigluBackend::swiglu_forward`].
pub fn swiglu<B: SwigluBackend, const D: usize>(
    g: Tensor<B, D>,
    u: Tensor<B, D>,
) -> Result<Tensor<B, D>, FlaError> {
    let y = B::swiglu_forward(g.into_primitive().tensor(), u.into_primitive().tensor())?;
    Ok(Tensor::<B, D>::from_primitive(TensorPrimitive::Float(y)))
}

/// The wrappers' view of the op: inputs `[g, u]`, output `y`, no state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwigluOp;

impl<B: SwigluBackend> StateOp<B> for SwigluOp {
    const FORWARD: &'static str = "fla_swiglu_forward";
    const BACKWARD: &'static str = "fla_swiglu_backward";
    const READS_OUTPUTS: bool = false;

    fn forward(&self, x: Inputs<B>) -> Result<Outputs<B>, FlaError> {
        let [Some(g), Some(u), ..] = x else {
            return Err(FlaError::Shape("swiglu takes g and u".into()));
        };
        Ok(Outputs {
            o: B::swiglu_forward(g, u)?,
            ht: None,
            aux: None,
        })
    }

    fn backward(
        &self,
        x: Inputs<B>,
        _out: Option<Outputs<B>>,
        dy: FloatTensor<B>,
        _d_ht: Option<FloatTensor<B>>,
    ) -> Result<Inputs<B>, FlaError> {
        let [Some(g), Some(u), ..] = x else {
            return Err(FlaError::Shape("swiglu takes g and u".into()));
        };
        let (dg, du) = B::swiglu_backward(g, u, dy)?;
        Ok([Some(dg), Some(du), None, None, None, None])
    }
}

tensor_op_impl!(SwigluBackend);

/// Validates `g` and `u` against each other and describes the call (dtype `f32` until a fused
/// backend fills it in); `y` is shaped like them.
pub(crate) fn describe<B: Backend>(
    g: &FloatTensor<B>,
    u: &FloatTensor<B>,
) -> Result<SwigluProblem, FlaError> {
    shared_float_dtype(("g", g), &[("u", Some(u))])?;
    let shape = g.shape().to_vec();
    expect_tensor("u", u, &shape, g.dtype())?;
    let p = SwigluProblem {
        len: shape.iter().product(),
        dtype: FloatDType::F32,
    };
    p.validate()?;
    Ok(p)
}

pub(crate) fn describe_backward<B: Backend>(
    g: &FloatTensor<B>,
    u: &FloatTensor<B>,
    dy: &FloatTensor<B>,
) -> Result<SwigluProblem, FlaError> {
    let p = describe::<B>(g, u)?;
    expect_tensor("gradient dy", dy, &g.shape().to_vec(), g.dtype())?;
    Ok(p)
}
