//! Matrix products as a Burn backend extension, so that a model's projections reach the fastest
//! product the device has: cuBLASLt on CUDA (enqueued on CubeCL's own stream,
//! `fla_cubecl_kernels::blas`), Burn's own matmul everywhere else. Burn's CUDA matmul issues
//! WMMA / `mma.sync` only, not Hopper's `wgmma`; on the 340M recipe's shapes cuBLASLt is measured
//! faster (`benches/results/README.md`, "Matmuls in a training step").

mod autodiff;
mod cube;
mod fusion;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};

use crate::checks::shared_float_dtype;
use crate::recorded::{Inputs, Outputs, StateOp};
use crate::FlaError;

/// Backend extension for the product `a · b` of two matrices.
///
/// The default method is Burn's own `float_matmul` (any backend); `CubeBackend<CudaRuntime>`
/// and `Fusion` of it override it with cuBLASLt, and `Autodiff<B>` records it with its backward
/// (`da = dc · bᵀ`, `db = aᵀ · dc`, both products of this trait again, on transposed views).
pub trait MatmulBackend: Backend {
    /// `a · b` for `a [m, k]` and `b [k, n]` of one float dtype, `[m, n]` in that dtype.
    /// Errors: [`FlaError::Shape`] for another rank or different inner sizes,
    /// [`FlaError::DType`] for mixed or non-float dtypes, [`FlaError::Empty`] for a zero size,
    /// [`FlaError::UnsupportedDType`] where the device cannot compute the dtype.
    fn matmul_forward(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>, FlaError> {
        describe::<Self>(&a, &b)?;
        Ok(Self::float_matmul(a, b))
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn matmul_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }
}

/// `[m, k, n]` of a valid product (module doc of [`MatmulBackend::matmul_forward`]).
pub(crate) fn describe<B: Backend>(
    a: &FloatTensor<B>,
    b: &FloatTensor<B>,
) -> Result<[usize; 3], FlaError> {
    shared_float_dtype(("a", a), &[("b", Some(b))])?;
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let (Ok([m, k]), Ok([k2, n])) = (
        <[usize; 2]>::try_from(sa.as_slice()),
        <[usize; 2]>::try_from(sb.as_slice()),
    ) else {
        return Err(FlaError::Shape(format!(
            "matmul takes two matrices, got {sa:?} and {sb:?}"
        )));
    };
    if k != k2 {
        return Err(FlaError::Shape(format!(
            "matmul of {sa:?} and {sb:?}: the inner sizes differ"
        )));
    }
    if m == 0 || k == 0 || n == 0 {
        return Err(FlaError::Empty(format!("matmul of {sa:?} and {sb:?}")));
    }
    Ok([m, k, n])
}

/// `a · b` for `a [m, k]` and `b [k, n]`: cuBLASLt on CUDA, Burn's matmul elsewhere;
/// differentiable in both under `Autodiff`. Errors: see [`MatmulBackend::matmul_forward`].
pub fn matmul<B: MatmulBackend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, FlaError> {
    let c = B::matmul_forward(a.into_primitive().tensor(), b.into_primitive().tensor())?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(c)))
}

/// A linear layer's `x · weight + bias` for `x [..., d_in]`, `weight [d_in, d_out]` (Burn's
/// `Linear` layout) and `bias [d_out]`: the leading axes are flattened into the product's rows.
/// Errors: as [`matmul`], and [`FlaError::Shape`] for a bias of another size.
pub fn linear<B: MatmulBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, D>, FlaError> {
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    if D == 0 || dims[D - 1] != d_in {
        return Err(FlaError::Shape(format!(
            "linear of x {dims:?} and weight [{d_in}, {d_out}]: x's last axis must be {d_in}"
        )));
    }
    if let Some(b) = &bias {
        if b.dims() != [d_out] {
            return Err(FlaError::Shape(format!(
                "linear's bias must be [{d_out}], got {:?}",
                b.dims()
            )));
        }
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = matmul(x.reshape([rows, d_in]), weight)?;
    let y = match bias {
        Some(b) => y + b.unsqueeze_dim(0),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = d_out;
    Ok(y.reshape(out))
}

/// The wrappers' view of the op: inputs `[a, b]`, output `c`, no state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulOp;

impl<B: MatmulBackend> StateOp<B> for MatmulOp {
    const FORWARD: &'static str = "fla_matmul_forward";
    const BACKWARD: &'static str = "fla_matmul_backward";
    const READS_OUTPUTS: bool = false;

    fn forward(&self, x: Inputs<B>) -> Result<Outputs<B>, FlaError> {
        let [Some(a), Some(b), ..] = x else {
            return Err(FlaError::Shape("matmul takes a and b".into()));
        };
        Ok(Outputs {
            o: B::matmul_forward(a, b)?,
            ht: None,
            aux: None,
        })
    }

    fn backward(
        &self,
        x: Inputs<B>,
        _out: Option<Outputs<B>>,
        dc: FloatTensor<B>,
        _d_ht: Option<FloatTensor<B>>,
    ) -> Result<Inputs<B>, FlaError> {
        let [Some(a), Some(b), ..] = x else {
            return Err(FlaError::Shape("matmul takes a and b".into()));
        };
        // Transposes are views on the cube backends; cuBLASLt reads them as they are stored.
        let da = B::matmul_forward(dc.clone(), B::float_transpose(b))?;
        let db = B::matmul_forward(B::float_transpose(a), dc)?;
        Ok([Some(da), Some(db), None, None, None, None])
    }
}

tensor_op_impl!(MatmulBackend);
