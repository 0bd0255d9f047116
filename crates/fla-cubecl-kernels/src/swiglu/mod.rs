//! SwiGLU's activation, fused: `y = swish(g) ∘ u` with `swish(g) = g · σ(g)` (FLA's `swiglu`, the
//! middle of `GatedMLP`), in `f32` whatever the inputs' dtype. Backward, with `s = σ(g)`:
//! `∂u = ∂y ∘ g s` and `∂g = ∂y ∘ u ∘ s (1 + g (1 − s))`.
//!
//! Why fused: through Burn's tensor ops autodiff keeps `σ(g)` and `swish(g)` beside `g` and `u`
//! for the backward (two more activations of the MLP's width per layer) and runs the backward
//! as several element-wise passes; here the backward reads `g`, `u` and `∂y` once and needs no
//! intermediate.

pub mod naive;

use cubecl::ir::features::EnumSet;
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::gated::recurrent_bwd::linear_unit;
use crate::gated::{array, elementwise_grid, ELEMWISE_THREADS};
use crate::problem::{self, fits};
use crate::{FloatDType, KernelError};

/// One call: `len` elements of `g` and `u` (any shape, flat), in `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct SwigluProblem {
    pub len: usize,
    pub dtype: FloatDType,
}

impl SwigluProblem {
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.len == 0 {
            return Err(KernelError::InvalidProblem(
                "zero-length input to swiglu".into(),
            ));
        }
        problem::addressable(self.len, "g")
    }
}

/// The floating-point freedoms of [`sigmoid_lanes`]: reduced-precision exponential and division
/// (CUDA's `__expf`, `__fdividef`: a few instructions each instead of a dozen), which these
/// element-wise kernels spend most of their instructions on. Finite inputs keep every operand
/// finite (both exponents are at most 0, the denominator lies in `[1, 2]`).
fn fast_sigmoid() -> EnumSet<FastMath> {
    FastMath::ReducedPrecision
        | FastMath::NotNaN
        | FastMath::NotInf
        | FastMath::AllowReciprocal
        | FastMath::UnsignedZero
}

/// `σ` of each lane of a vector, in `f32` (also the norm's swish gate), in the form whose
/// exponents are never positive: `σ(g) = exp(min(g, 0)) / (1 + exp(−|g|))`. So no exponential
/// overflows at any finite gate, and a very negative gate gives 0 (the exponential underflows),
/// not a tiny constant that `g σ(g)` would scale back up. A NaN gate gives a NaN `σ` (through
/// `|g|`), and every product that uses it is NaN.
#[cube(fast_math = fast_sigmoid())]
pub(crate) fn sigmoid_lanes<N: Size>(g: Vector<f32, N>) -> Vector<f32, N> {
    let zero = Vector::<f32, N>::new(0.0f32);
    let one = Vector::<f32, N>::new(1.0f32);
    let low = <Vector<f32, N> as FloatOps>::min(g, zero);
    // `0 − |g|`: CubeCL's CUDA code has no unary minus on vectors (nvcc rejected `-g`).
    Vector::exp(low) / (one + Vector::exp(zero - Vector::abs(g)))
}

/// Vectors of `N` neighbouring elements (16-byte loads where `N · size` reaches 16), `len` of
/// them.
#[cube(launch_unchecked)]
fn swiglu_fwd_kernel<F: Float, N: Size>(
    g: &Array<Vector<F, N>>,
    u: &Array<Vector<F, N>>,
    y: &mut Array<Vector<F, N>>,
    len: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = linear_unit();
    if i < len as usize {
        let gv = Vector::<f32, N>::cast_from(g[i]);
        let uv = Vector::<f32, N>::cast_from(u[i]);
        y[i] = Vector::<F, N>::cast_from(gv * sigmoid_lanes(gv) * uv);
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn swiglu_bwd_kernel<F: Float, N: Size>(
    g: &Array<Vector<F, N>>,
    u: &Array<Vector<F, N>>,
    dy: &Array<Vector<F, N>>,
    dg: &mut Array<Vector<F, N>>,
    du: &mut Array<Vector<F, N>>,
    len: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = linear_unit();
    if i < len as usize {
        let gv = Vector::<f32, N>::cast_from(g[i]);
        let d = Vector::<f32, N>::cast_from(dy[i]);
        let s = sigmoid_lanes(gv);
        let one = Vector::<f32, N>::new(1.0f32);
        du[i] = Vector::<F, N>::cast_from(d * gv * s);
        dg[i] = Vector::<F, N>::cast_from(
            d * Vector::<f32, N>::cast_from(u[i]) * s * (one + gv * (one - s)),
        );
    }
}

/// The widest vector the device loads well for `dtype` that divides `len` (1 at worst).
fn vector_size<R: Runtime>(client: &ComputeClient<R>, p: &SwigluProblem) -> usize {
    client
        .io_optimized_vector_sizes(p.dtype.size())
        .filter(|&n| n > 0 && p.len.is_multiple_of(n))
        .max()
        .unwrap_or(1)
}

fn checked<R: Runtime>(client: &ComputeClient<R>, p: &SwigluProblem) -> Result<(), KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)
}

/// `y = swish(g) ∘ u`; every buffer holds `len` elements of the problem's dtype.
pub fn swiglu_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &SwigluProblem,
    g: &Handle,
    u: &Handle,
    y: &Handle,
) -> Result<(), KernelError> {
    checked(client, p)?;
    for (name, h) in [("g", g), ("u", u), ("y", y)] {
        fits(name, h, p.len, p.dtype.size())?;
    }
    let n = vector_size(client, p);
    let len = p.len / n;
    // Every access is guarded by the kernel's own bound.
    unsafe {
        swiglu_fwd_kernel::launch_unchecked::<R>(
            client,
            elementwise_grid(len),
            CubeDim::new_1d(ELEMWISE_THREADS),
            n,
            array(g, len),
            array(u, len),
            array(y, len),
            len as u32,
            p.dtype.storage(),
        )
    };
    Ok(())
}

/// `dg` and `du` for `dy`; every buffer holds `len` elements of the problem's dtype.
pub fn swiglu_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &SwigluProblem,
    [g, u, dy]: [&Handle; 3],
    [dg, du]: [&Handle; 2],
) -> Result<(), KernelError> {
    checked(client, p)?;
    for (name, h) in [("g", g), ("u", u), ("dy", dy), ("dg", dg), ("du", du)] {
        fits(name, h, p.len, p.dtype.size())?;
    }
    let n = vector_size(client, p);
    let len = p.len / n;
    unsafe {
        swiglu_bwd_kernel::launch_unchecked::<R>(
            client,
            elementwise_grid(len),
            CubeDim::new_1d(ELEMWISE_THREADS),
            n,
            array(g, len),
            array(u, len),
            array(dy, len),
            array(dg, len),
            array(du, len),
            len as u32,
            p.dtype.storage(),
        )
    };
    Ok(())
}
