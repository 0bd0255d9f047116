//! Cross-entropy over a vocabulary, fused, as a Burn backend extension (FLA's
//! `FusedCrossEntropyLoss`: the language-model loss read from the logits once, in `f32` whatever
//! their dtype). See `fla_cubecl_kernels::cross_entropy` for the math.

mod autodiff;
mod cube;
mod fusion;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, IntDType, Tensor, TensorMetadata, TensorPrimitive};
use fla_cubecl_kernels::cross_entropy::CrossEntropyProblem;
use fla_cubecl_kernels::FloatDType;

use crate::checks::expect_tensor;
use crate::gated::fallback::{unwrap, wrap};
use crate::FlaError;

/// Backend extension for the fused cross-entropy.
///
/// The default methods compute through plain tensor ops (any backend); `CubeBackend` and
/// `Fusion<CubeBackend>` override them with the fused kernels, and `Autodiff<B>` records the
/// forward as one node whose backward is [`CrossEntropyBackend::cross_entropy_backward`] (it
/// keeps the logits, the targets and the per-row log-sum-exp).
pub trait CrossEntropyBackend: Backend {
    /// `(loss, lse)`, each `[N]` in `f32`: per row of `logits: [N, V]` (any float dtype) against
    /// `targets: [N]` (any int dtype), `lse = log Σ_v exp(x_v)` and `loss = lse − x_target`. A
    /// negative target ignores its row (loss 0, gradient 0); a target at or past `V` gives NaN on
    /// its row (the kernels cannot return an error, and checking the targets here would read them
    /// back from the device every step). Errors: [`FlaError::Shape`] for a logits tensor that is
    /// not `[N, V]` or targets that are not `[N]`, [`FlaError::DType`] for non-float logits or
    /// non-int targets, [`FlaError::Empty`] for `N = 0` or `V = 0`, [`FlaError::UnsupportedDType`]
    /// where the device cannot compute the logits' dtype.
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> Result<(FloatTensor<Self>, FloatTensor<Self>), FlaError> {
        let p = describe::<Self>(&logits, &targets)?;
        let rows = Rows::<Self>::new(logits, targets, &p);
        let lse = rows.lse();
        let picked = rows
            .x
            .clone()
            .gather(1, rows.safe.clone().reshape([p.rows, 1]))
            .reshape([p.rows]);
        let loss = (lse.clone() - picked)
            .mask_fill(rows.ignored, 0.0)
            .mask_fill(rows.past_end, f32::NAN);
        Ok((prim(loss), prim(lse)))
    }

    /// `∂logits` (shaped and typed like `logits`) for `dloss: [N]`, from the forward's `lse`:
    /// `dloss · (softmax(x) − onehot(target))`. Same errors as the forward. Not itself
    /// differentiable.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        let p = describe_backward::<Self>(&logits, &targets, &lse, &dloss)?;
        let dtype = logits.dtype();
        let rows = Rows::<Self>::new(logits, targets, &p);
        let [n, v] = [p.rows, p.vocab];
        let device = rows.x.device();
        let probs = (rows.x.clone() - wrap::<Self, 1>(lse).reshape([n, 1])).exp();
        let cols = Tensor::<Self, 1, Int>::arange(0..v as i64, &device);
        // The targets in arange's int dtype: comparisons take one dtype on some backends.
        let safe = rows.safe.clone().cast(IntDType::from(cols.dtype()));
        let hit = cols
            .reshape([1, v])
            .expand([n, v])
            .equal(safe.reshape([n, 1]).expand([n, v]))
            .float()
            .cast(burn::tensor::FloatDType::F32);
        let d = wrap::<Self, 1>(dloss)
            .mask_fill(rows.past_end, f32::NAN)
            .reshape([n, 1]);
        // An ignored row is exactly 0 whatever its logits (0 · NaN would not be).
        let ignored = rows.ignored.reshape([n, 1]).expand([n, v]);
        let dx = ((probs - hit) * d).mask_fill(ignored, 0.0);
        Ok(unwrap::<Self, 2>(dx, dtype))
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn cross_entropy_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }
}

/// The tensor-op path's view of a call: the logits in `f32`, the targets clamped into the
/// vocabulary (for the gather), and which rows are ignored or past the vocabulary.
struct Rows<B: Backend> {
    x: Tensor<B, 2>,
    safe: Tensor<B, 1, Int>,
    ignored: Tensor<B, 1, burn::tensor::Bool>,
    past_end: Tensor<B, 1, burn::tensor::Bool>,
}

impl<B: Backend> Rows<B> {
    fn new(logits: FloatTensor<B>, targets: IntTensor<B>, p: &CrossEntropyProblem) -> Self {
        let t = Tensor::<B, 1, Int>::from_primitive(targets);
        Self {
            x: wrap::<B, 2>(logits),
            ignored: t.clone().lower_elem(0),
            past_end: t.clone().greater_equal_elem(p.vocab as i64),
            safe: t.clamp(0, p.vocab as i64 - 1),
        }
    }

    /// `log Σ_v exp(x_v)` per row, `[N]`, shifted by the row's maximum.
    fn lse(&self) -> Tensor<B, 1> {
        let n = self.x.dims()[0];
        let m = self.x.clone().max_dim(1);
        ((self.x.clone() - m.clone()).exp().sum_dim(1).log() + m).reshape([n])
    }
}

fn prim<B: Backend>(t: Tensor<B, 1>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Per-row cross-entropy `[N]` (`f32`) of `logits: [N, V]` against `targets: [N]`, fused on
/// `CubeBackend` (CUDA, wgpu) and differentiable under `Autodiff`. A negative target ignores its
/// row (loss and gradient 0, as PyTorch's `ignore_index = -100`); a target at or past `V` gives
/// NaN on its row. Errors: see [`CrossEntropyBackend::cross_entropy_forward`].
pub fn cross_entropy<B: CrossEntropyBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 1>, FlaError> {
    let (loss, _) =
        B::cross_entropy_forward(logits.into_primitive().tensor(), targets.into_primitive())?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(loss)))
}

/// The mean of [`cross_entropy`] over the rows not ignored (PyTorch's and FLA's `reduction =
/// "mean"`), `[1]` in `f32`; 0 when every row is ignored.
pub fn cross_entropy_mean<B: CrossEntropyBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 1>, FlaError> {
    // In f32 as the losses are (the device's default float may be bf16, which counts exactly
    // only to 256).
    let counted = targets
        .clone()
        .greater_equal_elem(0)
        .float()
        .cast(burn::tensor::FloatDType::F32)
        .sum()
        .clamp_min(1.0);
    Ok(cross_entropy(logits, targets)?.sum() / counted)
}

tensor_op_impl!(CrossEntropyBackend);

/// Validates `logits: [N, V]` (float) and `targets: [N]` (int) and describes the call (dtype
/// `f32` until a fused backend fills it in).
pub(crate) fn describe<B: Backend>(
    logits: &FloatTensor<B>,
    targets: &IntTensor<B>,
) -> Result<CrossEntropyProblem, FlaError> {
    let dtype = logits.dtype();
    if !dtype.is_float() {
        return Err(FlaError::DType(format!(
            "logits are {dtype:?}, not a float type"
        )));
    }
    let (shape, t_shape) = (logits.shape().to_vec(), targets.shape().to_vec());
    let [rows, vocab] = <[usize; 2]>::try_from(shape.as_slice())
        .map_err(|_| FlaError::Shape(format!("logits must be [N, V], got {shape:?}")))?;
    if t_shape != [rows] {
        return Err(FlaError::Shape(format!(
            "targets must be [{rows}] (one per row of logits {shape:?}), got {t_shape:?}"
        )));
    }
    if !(targets.dtype().is_int() || targets.dtype().is_uint()) {
        return Err(FlaError::DType(format!(
            "targets are {:?}, not an int type",
            targets.dtype()
        )));
    }
    if rows == 0 || vocab == 0 {
        return Err(FlaError::Empty(format!(
            "cross-entropy of {rows} rows of {vocab} logits"
        )));
    }
    let p = CrossEntropyProblem {
        rows,
        vocab,
        dtype: FloatDType::F32,
    };
    p.validate()?;
    Ok(p)
}

pub(crate) fn describe_backward<B: Backend>(
    logits: &FloatTensor<B>,
    targets: &IntTensor<B>,
    lse: &FloatTensor<B>,
    dloss: &FloatTensor<B>,
) -> Result<CrossEntropyProblem, FlaError> {
    let p = describe::<B>(logits, targets)?;
    expect_tensor("lse", lse, &[p.rows], DType::F32)?;
    expect_tensor("gradient dloss", dloss, &[p.rows], DType::F32)?;
    Ok(p)
}
