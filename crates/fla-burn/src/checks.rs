//! Input checks shared by the op families' `describe` functions.

use burn::tensor::{DType, TensorMetadata};

use crate::FlaError;

/// `q, k, v` of rank 4 (`[B, T, H, D]`) with `q` and `k` equal; returns the shapes of `q` and `v`.
pub(crate) fn qkv_shapes<T: TensorMetadata>(
    q: &T,
    k: &T,
    v: &T,
) -> Result<([usize; 4], [usize; 4]), FlaError> {
    let (qs, ks, vs) = (q.shape().to_vec(), k.shape().to_vec(), v.shape().to_vec());
    let four = |s: &[usize]| <[usize; 4]>::try_from(s).ok();
    let (Some(q4), Some(_), Some(v4)) = (four(&qs), four(&ks), four(&vs)) else {
        return Err(FlaError::Shape(format!(
            "q, k, v must be [B, T, H, D]; got q {qs:?}, k {ks:?}, v {vs:?}"
        )));
    };
    if qs != ks {
        return Err(FlaError::Shape(format!("q {qs:?} and k {ks:?} differ")));
    }
    Ok((q4, v4))
}

/// The first tensor's dtype, a float that every other given tensor shares; `(name, tensor)`
/// pairs, the names used in the errors.
pub(crate) fn shared_float_dtype<T: TensorMetadata>(
    (first, t0): (&str, &T),
    others: &[(&str, Option<&T>)],
) -> Result<DType, FlaError> {
    let dtype = t0.dtype();
    if !dtype.is_float() {
        return Err(FlaError::DType(format!(
            "{first} is {dtype:?}, not a float type"
        )));
    }
    for (name, t) in others {
        if let Some(t) = t {
            if t.dtype() != dtype {
                return Err(FlaError::DType(format!(
                    "{name} is {:?} but {first} is {dtype:?}; the inputs share one dtype",
                    t.dtype()
                )));
            }
        }
    }
    Ok(dtype)
}

/// `t` has shape `want` ([`FlaError::Shape`] otherwise) and dtype `dtype` ([`FlaError::DType`]).
pub(crate) fn expect_tensor<T: TensorMetadata>(
    name: &str,
    t: &T,
    want: &[usize],
    dtype: DType,
) -> Result<(), FlaError> {
    if t.shape().as_slice() != want {
        return Err(FlaError::Shape(format!(
            "{name} must be {want:?}, got {:?}",
            t.shape().to_vec()
        )));
    }
    if t.dtype() != dtype {
        return Err(FlaError::DType(format!(
            "{name} is {:?}, expected {dtype:?}",
            t.dtype()
        )));
    }
    Ok(())
}
