//! `CubeBackend` (CUDA, wgpu): the backward by `fla_cubecl_kernels::embedding`; the lookup
//! itself is Burn's `select` (the trait's default).

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::embedding::{check_device, embedding_backward, EmbeddingProblem};

use super::{describe_backward, EmbeddingBackend};
use crate::gated::cube::{empty, i32_ids};
use crate::gated::kernel_dtype;
use crate::FlaError;

impl<R, F, I, BT> EmbeddingBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn embedding_weight_grad(
        dy: CubeTensor<R>,
        ids: CubeTensor<R>,
        vocab: usize,
    ) -> Result<CubeTensor<R>, FlaError> {
        let mut p = describe_backward::<Self>(&dy, &ids, vocab)?;
        p.dtype = kernel_dtype(dy.dtype())?;
        // The kernels index flat row-major buffers.
        let (dy, ids) = (into_contiguous(dy), i32_ids::<R, F, I, BT>(ids, vocab));
        let dw = empty(&dy, vec![vocab, p.dim], dy.dtype());
        embedding_backward(&dy.client, &p, [&dy.handle, &ids.handle], &dw.handle)?;
        Ok(dw)
    }

    fn embedding_check(
        device: &Self::Device,
        dtype: DType,
        p: &EmbeddingProblem,
    ) -> Result<(), FlaError> {
        let p = EmbeddingProblem {
            dtype: kernel_dtype(dtype)?,
            ..p.clone()
        };
        check_device(&R::client(device), &p)?;
        Ok(())
    }
}
