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
        Self::matmul_check_dtype(&a.device, a.dtype())?;
        #[cfg(feature = "cuda")]
        let (a, b) = match on_cuda(a, b) {
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

/// Set when a cuBLASLt call failed (no `libcublasLt.so`, no memory for its workspace, no
/// algorithm): the products fall back to Burn's matmul from then on, as a fused or recorded op
/// has no error path left when it runs.
#[cfg(feature = "cuda")]
static CUBLASLT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether cuBLASLt serves CUDA products: yes unless `FLA_CUBLASLT=0` (read once) or a call
/// failed.
#[cfg(feature = "cuda")]
fn cublaslt_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("FLA_CUBLASLT").map_or(true, |v| v != "0"));
    on && !CUBLASLT_FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `t` as a `U` when `T` is `U` (the runtime is a type parameter here, so the CUDA tensors are
/// recovered by a type check rather than a trait bound every runtime would need).
#[cfg(feature = "cuda")]
fn same_type<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    use std::any::Any;
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("present")),
        None => Err(slot.expect("not taken")),
    }
}

/// The product through cuBLASLt when `R` is the CUDA runtime (`Ok(c)`); the operands back
/// (`Err`), for Burn's matmul, otherwise and after a cuBLASLt failure, which is reported once.
#[cfg(feature = "cuda")]
// `Err` hands the operands back by value (not an error), once per product.
#[allow(clippy::result_large_err)]
fn on_cuda<R: CubeRuntime>(
    a: CubeTensor<R>,
    b: CubeTensor<R>,
) -> Result<CubeTensor<R>, (CubeTensor<R>, CubeTensor<R>)> {
    use cubecl::cuda::CudaRuntime;
    if !cublaslt_enabled() {
        return Err((a, b));
    }
    type Pair<R> = (CubeTensor<R>, CubeTensor<R>);
    let (a, b) = same_type::<Pair<R>, Pair<CudaRuntime>>((a, b))?;
    match crate::blas::matmul_tensors(a.clone(), b.clone()) {
        Ok(c) => Ok(same_type(c).unwrap_or_else(|_| unreachable!("R is CudaRuntime"))),
        Err(e) => {
            if !CUBLASLT_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "fla: cuBLASLt failed ({e}); matrix products use Burn's matmul from now on"
                );
            }
            Err(same_type((a, b)).unwrap_or_else(|_| unreachable!("R is CudaRuntime")))
        }
    }
}
