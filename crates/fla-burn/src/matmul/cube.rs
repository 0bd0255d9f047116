//! `CubeBackend`: cuBLASLt on the CUDA runtime (crate feature `cuda`), Burn's own matmul on
//! every other runtime and when `FLA_CUBLASLT=0` (to compare the two in one build).

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::{describe, MatmulBackend};
use crate::gated::kernel_dtype;
use crate::FlaError;

impl<R, F, I, BT> MatmulBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn matmul_forward(a: CubeTensor<R>, b: CubeTensor<R>) -> Result<CubeTensor<R>, FlaError> {
        describe::<Self>(&a, &b)?;
        kernel_dtype(a.dtype())?.check_supported(&a.client)?;
        #[cfg(feature = "cuda")]
        let (a, b) = match on_cuda(a, b)? {
            Ok(c) => return Ok(c),
            Err(ab) => ab,
        };
        Ok(Self::float_matmul(a, b))
    }

    fn matmul_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        kernel_dtype(dtype)?.check_supported(&R::client(device))?;
        Ok(())
    }
}

/// Whether cuBLASLt serves CUDA products: yes unless `FLA_CUBLASLT=0`, read once.
#[cfg(feature = "cuda")]
fn cublaslt_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLA_CUBLASLT").map_or(true, |v| v != "0"))
}

/// The product through cuBLASLt when `R` is the CUDA runtime (`Ok(c)`); the operands back
/// otherwise (`Err`), for Burn's matmul. The runtime is a type parameter here, so the CUDA
/// tensors are recovered by a type check rather than a trait bound every runtime would need.
#[cfg(feature = "cuda")]
#[allow(clippy::type_complexity)]
fn on_cuda<R: CubeRuntime>(
    a: CubeTensor<R>,
    b: CubeTensor<R>,
) -> Result<Result<CubeTensor<R>, (CubeTensor<R>, CubeTensor<R>)>, FlaError> {
    use cubecl::cuda::CudaRuntime;
    use std::any::Any;
    if !cublaslt_enabled() {
        return Ok(Err((a, b)));
    }
    let mut slot = Some((a, b));
    let Some(cuda) = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<(CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>)>>()
    else {
        return Ok(Err(slot.expect("not taken")));
    };
    let (a, b) = cuda.take().expect("present");
    let mut c = Some(crate::blas::matmul_tensors(a, b)?);
    let c = (&mut c as &mut dyn Any)
        .downcast_mut::<Option<CubeTensor<R>>>()
        .and_then(Option::take)
        .expect("R is CudaRuntime: checked above");
    Ok(Ok(c))
}
