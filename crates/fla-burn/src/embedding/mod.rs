//! Embedding lookup as a Burn backend extension, for its backward: Burn's own
//! (`select_add` on CubeCL) runs one unit per table column through every token, 6.2 ms of a
//! training step of FLA's 340M recipe on an H100; `fla_cubecl_kernels::embedding` sorts the
//! tokens by id and sums each table entry's rows in parallel, in token order.

mod autodiff;
mod cube;
mod fusion;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Tensor, TensorMetadata, TensorPrimitive};
use fla_cubecl_kernels::embedding::EmbeddingProblem;
use fla_cubecl_kernels::FloatDType;

use crate::FlaError;

/// Backend extension for the embedding lookup.
///
/// The default methods compute through plain tensor ops (any backend); `CubeBackend` and
/// `Fusion<CubeBackend>` override the backward with the kernels, and `Autodiff<B>` records the
/// lookup as one node over the table whose backward is
/// [`EmbeddingBackend::embedding_weight_grad`] (it keeps the ids only).
pub trait EmbeddingBackend: Backend {
    /// Rows `ids` of `weight: [V, D]`, as `[N, D]`, for `ids: [N]` of any int dtype (Burn's
    /// `select`). An id outside `0 .. V` is not checked (that would read the ids back from the
    /// device every step): Burn's `select` reads it unchecked on CubeCL, as Burn's own `Embedding`
    /// does. Errors: [`FlaError::Shape`] for a table that is not `[V, D]` or ids that are not
    /// `[N]`, [`FlaError::DType`] for a non-float table or non-int ids, [`FlaError::Empty`] for
    /// `N`, `V` or `D` of 0; under `Autodiff`, also what [`EmbeddingBackend::embedding_check`]
    /// refuses for the backward to come ([`FlaError::UnsupportedDType`], [`FlaError::Kernel`] for a
    /// device limit).
    fn embedding_forward(
        weight: FloatTensor<Self>,
        ids: IntTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        describe::<Self>(&weight, &ids)?;
        Ok(Self::float_select(weight, 0, ids))
    }

    /// `∂weight: [V, D]` (the dtype of `dy`) for `dy: [N, D]`: row `v` sums the rows of `dy` whose
    /// id is `v`; an id outside `0 .. V` contributes nothing. Same errors as the forward, and
    /// [`FlaError::UnsupportedDType`] where the device cannot compute `dy`'s dtype. Not itself
    /// differentiable.
    fn embedding_weight_grad(
        dy: FloatTensor<Self>,
        ids: IntTensor<Self>,
        vocab: usize,
    ) -> Result<FloatTensor<Self>, FlaError> {
        let p = describe_backward::<Self>(&dy, &ids, vocab)?;
        let dy = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(dy));
        let ids = Tensor::<Self, 1, Int>::from_primitive(ids);
        let device = dy.device();
        let outside = ids
            .clone()
            .lower_elem(0)
            .bool_or(ids.clone().greater_equal_elem(vocab as i64));
        let dy = dy.mask_fill(
            outside.reshape([p.tokens, 1]).expand([p.tokens, p.dim]),
            0.0,
        );
        let zeros = Tensor::<Self, 2>::zeros([vocab, p.dim], (&device, dy.dtype()));
        let dw = zeros.select_assign(
            0,
            ids.clamp(0, vocab as i64 - 1),
            dy,
            burn::tensor::IndexingUpdateOp::Add,
        );
        Ok(dw.into_primitive().tensor())
    }

    /// Checks, before any of it is deferred, that the device can run the backward of `p` (from
    /// the forward's validation) on a table of `dtype`: the dtype, and the kernels' limits
    /// (`fla_cubecl_kernels::embedding::check_device`). Backends with no restriction accept all.
    fn embedding_check(
        _device: &Self::Device,
        _dtype: DType,
        _p: &EmbeddingProblem,
    ) -> Result<(), FlaError> {
        Ok(())
    }
}

tensor_op_impl!(EmbeddingBackend);

/// Rows `input_ids` of `weight: [V, D]`: `[B, T, D]` for `input_ids: [B, T]`, as Burn's
/// `Embedding::forward`, differentiable in `weight` under `Autodiff` through the fused backward.
/// Errors: see [`EmbeddingBackend::embedding_forward`].
pub fn embedding<B: EmbeddingBackend>(
    weight: Tensor<B, 2>,
    input_ids: Tensor<B, 2, Int>,
) -> Result<Tensor<B, 3>, FlaError> {
    let [b, t] = input_ids.dims();
    // Refused before the reshape, where Burn reads a 0 as "keep this axis".
    if b * t == 0 {
        return Err(FlaError::Empty(format!(
            "zero-length embedding: ids of shape [{b}, {t}]"
        )));
    }
    let d = weight.dims()[1];
    let ids = input_ids.reshape([b * t]);
    let rows = B::embedding_forward(weight.into_primitive().tensor(), ids.into_primitive())?;
    Ok(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(rows)).reshape([b, t, d]))
}

/// Validates `weight: [V, D]` (float) and `ids: [N]` (int) and describes the backward's problem
/// (dtype `f32` until a fused backend fills it in).
pub(crate) fn describe<B: Backend>(
    weight: &FloatTensor<B>,
    ids: &IntTensor<B>,
) -> Result<EmbeddingProblem, FlaError> {
    let shape = weight.shape().to_vec();
    let [vocab, dim] = <[usize; 2]>::try_from(shape.as_slice())
        .map_err(|_| FlaError::Shape(format!("the table must be [V, D], got {shape:?}")))?;
    if !weight.dtype().is_float() {
        return Err(FlaError::DType(format!(
            "the table is {:?}, not a float type",
            weight.dtype()
        )));
    }
    rows_of::<B>(ids, vocab, dim)
}

/// Validates `dy: [N, D]` (float) against `ids: [N]` (int) and a table of `vocab` rows.
pub(crate) fn describe_backward<B: Backend>(
    dy: &FloatTensor<B>,
    ids: &IntTensor<B>,
    vocab: usize,
) -> Result<EmbeddingProblem, FlaError> {
    let shape = dy.shape().to_vec();
    let [tokens, dim] = <[usize; 2]>::try_from(shape.as_slice())
        .map_err(|_| FlaError::Shape(format!("dy must be [N, D], got {shape:?}")))?;
    if !dy.dtype().is_float() {
        return Err(FlaError::DType(format!(
            "dy is {:?}, not a float type",
            dy.dtype()
        )));
    }
    let p = rows_of::<B>(ids, vocab, dim)?;
    if p.tokens != tokens {
        return Err(FlaError::Shape(format!(
            "dy has {tokens} rows for {} ids",
            p.tokens
        )));
    }
    Ok(p)
}

fn rows_of<B: Backend>(
    ids: &IntTensor<B>,
    vocab: usize,
    dim: usize,
) -> Result<EmbeddingProblem, FlaError> {
    let ids_shape = ids.shape().to_vec();
    let [tokens] = <[usize; 1]>::try_from(ids_shape.as_slice())
        .map_err(|_| FlaError::Shape(format!("ids must be [N], got {ids_shape:?}")))?;
    if !(ids.dtype().is_int() || ids.dtype().is_uint()) {
        return Err(FlaError::DType(format!(
            "ids are {:?}, not an int type",
            ids.dtype()
        )));
    }
    let p = EmbeddingProblem {
        tokens,
        vocab,
        dim,
        dtype: FloatDType::F32,
    };
    p.validate()?;
    Ok(p)
}
