//! Matrix products of CUDA tensors through cuBLASLt, the CUDA side of [`crate::matmul`]
//! (`fla_cubecl_kernels::blas` says why and how it is ordered with CubeCL's work).

use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::cuda::CudaRuntime;
use fla_cubecl_kernels::blas::{cublaslt_gemm, GemmProblem};

use crate::gated::cube::empty;
use crate::gated::kernel_dtype;
use crate::FlaError;

type Cuda<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

/// A 2-D tensor as cuBLASLt reads it: row-major (`false`) or a transposed view of a row-major
/// matrix (`true`), with the distance between its stored rows. Another layout is made contiguous.
fn oriented(t: CubeTensor<CudaRuntime>) -> (CubeTensor<CudaRuntime>, bool, usize) {
    let (dims, strides) = (t.shape().to_vec(), t.meta.strides().to_vec());
    let (rows, cols) = (dims[0], dims[1]);
    if strides[1] == 1 && strides[0] >= cols {
        return (t, false, strides[0]);
    }
    if strides[0] == 1 && strides[1] >= rows {
        return (t, true, strides[1]);
    }
    let t = into_contiguous(t);
    let ld = t.meta.strides()[0];
    (t, false, ld)
}

/// `lhs · rhs` for `[m, k]` and `[k, n]` tensors of one float dtype on CUDA, by cuBLASLt:
/// enqueued on CubeCL's stream (no host wait) when the buffers share it. `crate::matmul` is the
/// differentiable op that models use; this is its CUDA product, callable alone.
pub fn matmul<F, I, BT>(
    lhs: Tensor<Cuda<F, I, BT>, 2>,
    rhs: Tensor<Cuda<F, I, BT>, 2>,
) -> Result<Tensor<Cuda<F, I, BT>, 2>, FlaError>
where
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let c = matmul_tensors(lhs.into_primitive().tensor(), rhs.into_primitive().tensor())?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(c)))
}

/// The product on CUDA primitives, checked as `crate::matmul`'s forward checks its inputs.
pub(crate) fn matmul_tensors(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
) -> Result<CubeTensor<CudaRuntime>, FlaError> {
    // The op's own checks (shapes, one float dtype, no empty axis), so a direct call fails as
    // the differentiable op does; the backend's element types don't enter them.
    let [m, k, n] = crate::matmul::describe::<Cuda<f32, i32, u8>>(&a, &b)?;
    let dtype = kernel_dtype(a.dtype())?;
    let ((a, a_trans, lda), (b, b_trans, ldb)) = (oriented(a), oriented(b));
    let c = empty(&a, vec![m, n], a.dtype());
    let p = GemmProblem {
        m,
        n,
        k,
        a_trans,
        b_trans,
        lda,
        ldb,
        ldc: c.meta.strides()[0],
        dtype,
    };
    cublaslt_gemm(&a.client, &p, [&a.handle, &b.handle], &c.handle)?;
    Ok(c)
}
