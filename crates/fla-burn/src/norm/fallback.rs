//! The norm through plain Burn tensor ops, in `f32`: correct on any backend (NdArray here), and
//! the same steps as the kernels, row by row as `[rows, D]`.

use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata};

use super::{describe, describe_backward, NormForward, NormGrads, NormOpOptions, NormTensors};
use crate::gated::fallback::{unwrap, wrap};
use crate::FlaError;

/// `t` as an `f32` matrix `[rows, cols]`.
fn matrix<B: Backend>(t: FloatTensor<B>, rows: usize, cols: usize) -> Tensor<B, 2> {
    wrap::<B, 2>(t).reshape([rows, cols])
}

/// Back to `like`'s shape and `dtype`.
fn shaped<B: Backend>(t: Tensor<B, 2>, like: &FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    let t: Tensor<B, 1> = t.flatten(0, 1);
    B::float_reshape(unwrap::<B, 1>(t, dtype), like.shape())
}

pub(crate) fn forward<B: Backend>(
    x: NormTensors<B>,
    opts: &NormOpOptions,
) -> Result<NormForward<B>, FlaError> {
    let p = describe(&x, opts)?;
    let dtype = x.x.dtype();
    let like = x.x.clone();
    let xm = matrix::<B>(x.x, p.rows, p.dim);
    let w = matrix::<B>(x.w, 1, p.dim);
    let rms = (xm.clone().square().mean_dim(1) + p.eps as f64).sqrt();
    // A division, not `recip`: NdArray's vectorised `recip` is an approximation (measured 5e-5
    // off in f32).
    let r = rms.ones_like() / rms;
    let mut y = xm * r.clone() * w;
    if let Some(g) = x.g {
        let g = matrix::<B>(g, p.rows, p.dim);
        y = y * g.clone() * sigmoid(g);
    }
    Ok(NormForward {
        y: shaped(y, &like, dtype),
        rstd: unwrap::<B, 1>(r.reshape([p.rows]), DType::F32),
    })
}

pub(crate) fn backward<B: Backend>(
    x: NormTensors<B>,
    rstd: FloatTensor<B>,
    dy: FloatTensor<B>,
    opts: &NormOpOptions,
) -> Result<NormGrads<B>, FlaError> {
    let p = describe_backward(&x, &rstd, &dy, opts)?;
    let dtype = x.x.dtype();
    let (x_like, w_like) = (x.x.clone(), x.w.clone());
    let r = matrix::<B>(rstd, p.rows, 1);
    let xh = matrix::<B>(x.x, p.rows, p.dim) * r.clone();
    let w = matrix::<B>(x.w, 1, p.dim);
    let mut dn = matrix::<B>(dy, p.rows, p.dim);
    let mut dg = None;
    if let Some(g) = x.g {
        let g_like = g.clone();
        let g = matrix::<B>(g, p.rows, p.dim);
        let s = sigmoid(g.clone());
        // d swish(g)/dg = σ(g) (1 + g (1 − σ(g))).
        let dswish = s.clone() * (g.clone() * (s.clone().neg() + 1.0) + 1.0);
        dg = Some(shaped(
            dn.clone() * xh.clone() * w.clone() * dswish,
            &g_like,
            dtype,
        ));
        dn = dn * g * s;
    }
    let dw: Tensor<B, 2> = (dn.clone() * xh.clone()).sum_dim(0);
    let dxh = dn * w;
    let mean = (dxh.clone() * xh.clone()).mean_dim(1);
    // dx = r (∂x̂ − x̂ mean(∂x̂ ∘ x̂)).
    let dx = (dxh - xh * mean) * r;
    Ok(NormGrads {
        dx: shaped(dx, &x_like, dtype),
        dw: shaped(dw, &w_like, dtype),
        dg,
    })
}
