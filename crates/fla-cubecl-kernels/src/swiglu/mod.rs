//! SwiGLU's activation, fused: `y = swish(g) ∘ u` with `swish(g) = g · σ(g)` (FLA's `swiglu`, the
//! middle of `GatedMLP`), in `f32` whatever the inputs' dtype. Backward, with `s = σ(g)`:
//! `∂u = ∂y ∘ g s` and `∂g = ∂y ∘ u ∘ s (1 + g (1 − s))`.
//!
//! Why fused: through Burn's tensor ops autodiff keeps `σ(g)` and `swish(g)` beside `g` and `u`
//! for the backward (two more activations of the MLP's width per layer) and runs the backward
//! as several element-wise passes; here the backward reads `g`, `u` and `∂y` once and needs no
//! intermediate.

pub mod naive;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::gated::recurrent_bwd::linear_unit;
use crate::gated::{array, elementwise_grid, ELEMWISE_THREADS};
use crate::problem;
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

/// `σ(g)` in `f32` (also the norm's swish gate).
#[cube]
pub(crate) fn sigmoid(g: f32) -> f32 {
    1.0f32 / (1.0f32 + f32::exp(-g))
}

#[cube(launch_unchecked)]
fn swiglu_fwd_kernel<F: Float>(
    g: &Array<F>,
    u: &Array<F>,
    y: &mut Array<F>,
    len: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = linear_unit();
    if i < len as usize {
        let gv = f32::cast_from(g[i]);
        y[i] = F::cast_from(gv * sigmoid(gv) * f32::cast_from(u[i]));
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn swiglu_bwd_kernel<F: Float>(
    g: &Array<F>,
    u: &Array<F>,
    dy: &Array<F>,
    dg: &mut Array<F>,
    du: &mut Array<F>,
    len: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = linear_unit();
    if i < len as usize {
        let gv = f32::cast_from(g[i]);
        let d = f32::cast_from(dy[i]);
        let s = sigmoid(gv);
        du[i] = F::cast_from(d * gv * s);
        dg[i] = F::cast_from(d * f32::cast_from(u[i]) * s * (1.0f32 + gv * (1.0f32 - s)));
    }
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
    // Every access is guarded by the kernel's own bound.
    unsafe {
        swiglu_fwd_kernel::launch_unchecked::<R>(
            client,
            elementwise_grid(p.len),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(g, p.len),
            array(u, p.len),
            array(y, p.len),
            p.len as u32,
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
    unsafe {
        swiglu_bwd_kernel::launch_unchecked::<R>(
            client,
            elementwise_grid(p.len),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(g, p.len),
            array(u, p.len),
            array(dy, p.len),
            array(dg, p.len),
            array(du, p.len),
            p.len as u32,
            p.dtype.storage(),
        )
    };
    Ok(())
}
