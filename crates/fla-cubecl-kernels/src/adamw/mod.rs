//! One AdamW step on one parameter tensor, fused: gradient clipping (by value, or by the tensor's
//! L2 norm), both moments, their bias corrections, decoupled weight decay (optionally cautious)
//! and the update, with the parameter and the moments updated in place.
//!
//! The math is Burn's `AdamW` (burn-optim 0.21) with its per-tensor `GradientClipping`, so in
//! `f32` a model trains the same under either (in half precision Burn rounds each intermediate
//! to the dtype, this step only its results), and their records are interchangeable. With `t` the step
//! count after this step, `ĝ` the clipped gradient and `λ = lr · weight_decay`:
//! - `m ← β₁ m + (1 − β₁) ĝ`, `v ← β₂ v + (1 − β₂) ĝ²` (on the first step `m` and `v` are zero);
//! - `δ = (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)`;
//! - `p ← p (1 − λ) − lr δ`; cautious weight decay skips the decay where `p` and `m` differ in
//!   sign (`p ≥ 0` against `m ≥ 0`, as Burn compares them).
//! - Clipping by norm scales `g` by `min(1, c / (‖g‖₂ + tiny))`, `tiny` the dtype's smallest
//!   positive normal; clipping by value clamps it to `[−c, c]`.
//!
//! Why fused: through Burn's tensor ops a step is about 27 kernels per parameter tensor (the
//! clipping's norm and scale, each moment's scale and sum, the corrections, the root, the
//! division, the decay and the update; measured on the 340M GLA recipe), each a pass over the
//! tensor and its state. Here it is one pass (three kernels with clipping by norm: the norm's
//! partial sums, their total, the update), reading `p, g, m, v` once and writing `p, m, v` once.
//! Everything computes in `f32`, and the update reads the new moments before they are rounded
//! to the dtype for storage (Burn's reads them as stored: in half precision that differs from
//! ours by the moments' rounding, and where a stored `v` underflows to zero, Burn's update
//! becomes `m / ε`).

pub mod naive;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::gated::recurrent_bwd::linear_unit;
use crate::gated::{array, elementwise_grid, ELEMWISE_THREADS};
use crate::norm::cube_sum;
use crate::problem::fits;
use crate::{FloatDType, KernelError};

/// Units per cube of the norm's two reduction kernels.
const SUM_UNITS: usize = 256;
/// The most entries of one parameter tensor: indices and the launch's spare units stay within
/// the kernels' 32-bit arithmetic (a larger tensor takes Burn's tensor ops).
pub const MAX_ADAMW_LEN: usize = 1 << 31;

/// Most cubes of the norm's first pass (each then strides over `len / parts` elements): enough
/// to fill a large GPU, few enough for one cube to total them.
const MAX_PARTS: usize = 1024;

/// Gradient clipping before the step (Burn's `GradientClipping`, applied per tensor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradClip {
    /// Clamp every entry to `[−c, c]`.
    Value(f32),
    /// Scale the gradient so that its L2 norm is at most `c`.
    Norm(f32),
}

/// One call: `len` elements of the parameter, its gradient and both moments, all in `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWProblem {
    pub len: usize,
    pub dtype: FloatDType,
    /// Whether `m` and `v` hold the previous steps' moments; `false` on the first step, when they
    /// are written without being read.
    pub has_state: bool,
}

/// The step's hyperparameters, as Burn's `AdamWConfig` names them, and the step count `time`
/// after this step (1 on the first).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    pub cautious_weight_decay: bool,
    pub clip: Option<GradClip>,
    pub time: usize,
}

impl AdamWStep {
    /// Checks the hyperparameters and the step count (`has_state`: whether moments are given).
    pub fn validate(&self, has_state: bool) -> Result<(), KernelError> {
        let bad = |msg: String| Err(KernelError::InvalidProblem(msg));
        if self.time == 0 {
            return bad(
                "AdamW's step count starts at 1 (the bias corrections divide by 1 − βᵗ)".into(),
            );
        }
        if !has_state && self.time != 1 {
            return bad(format!(
                "AdamW step {} without moments: only the first step starts from none",
                self.time
            ));
        }
        for (name, beta) in [("beta_1", self.beta_1), ("beta_2", self.beta_2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("AdamW's {name} must lie in [0, 1), got {beta}"));
            }
        }
        if !self.lr.is_finite() || !self.epsilon.is_finite() || !self.weight_decay.is_finite() {
            return bad(format!(
                "AdamW's learning rate, epsilon and weight decay must be finite, got {}, {}, {}",
                self.lr, self.epsilon, self.weight_decay
            ));
        }
        if let Some(GradClip::Value(c) | GradClip::Norm(c)) = self.clip {
            if !(c > 0.0 && c.is_finite()) {
                return bad(format!(
                    "gradient clipping needs a positive finite threshold, got {c}"
                ));
            }
        }
        Ok(())
    }
}

impl AdamWProblem {
    /// Checks the length; the step is checked on its own ([`AdamWStep::validate`]).
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.len == 0 {
            return Err(KernelError::InvalidProblem(
                "zero-length parameter in the AdamW step".into(),
            ));
        }
        if self.len > MAX_ADAMW_LEN {
            return Err(KernelError::DeviceLimit(format!(
                "{} entries in one parameter tensor, more than the fused AdamW step's {MAX_ADAMW_LEN}",
                self.len
            )));
        }
        Ok(())
    }
}

/// Which clipping the update kernel applies (compile-time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClipKind {
    None,
    Value,
    Norm,
}

/// Compile-time shape of the update kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdamWLayout {
    pub has_state: bool,
    pub clip: ClipKind,
    pub cautious: bool,
    /// Whether the parameter, `m` and `v` are read from separate sources ([`Slot::Into`])
    /// rather than from the buffers the step writes.
    pub into: [bool; 3],
}

/// Where one of the step's three results (the parameter, `m`, `v`) goes: over its input, or
/// into a fresh buffer `to`, the input `from` left as it was. The second is for an input that
/// another tensor still holds (burn-train's learner keeps the model it hands the optimiser a
/// clone of): writing the result elsewhere in the same pass saves a copy kernel per tensor.
#[derive(Debug, Clone, Copy)]
pub enum Slot<'a> {
    InPlace(&'a Handle),
    Into { from: &'a Handle, to: &'a Handle },
}

impl<'a> Slot<'a> {
    /// The buffer read (the step's input).
    fn source(&self) -> &'a Handle {
        match *self {
            Slot::InPlace(h) | Slot::Into { from: h, .. } => h,
        }
    }
    /// The buffer written (the step's result).
    fn target(&self) -> &'a Handle {
        match *self {
            Slot::InPlace(h) | Slot::Into { to: h, .. } => h,
        }
    }
    fn fresh(&self) -> bool {
        matches!(self, Slot::Into { .. })
    }
}

/// The smallest positive normal of `dtype`: what Burn adds to the norm before dividing by it.
pub fn min_positive(dtype: FloatDType) -> f32 {
    match dtype {
        FloatDType::F32 | FloatDType::BF16 => f32::MIN_POSITIVE,
        FloatDType::F16 => half::f16::MIN_POSITIVE.to_f32(),
    }
}

/// `part[c]`: the sum of `g²` over the entries cube `c` visits (`c·units + u`, then strides of
/// all cubes' units).
#[cube(launch_unchecked)]
fn square_sum_kernel<F: Float>(
    g: &Array<F>,
    part: &mut Array<f32>,
    offset: u32,
    len: u32,
    #[comptime] units: usize,
    #[define(F)] _dtype: StorageType,
) {
    let mut scratch = SharedMemory::<f32>::new(units);
    let stride = CUBE_COUNT_X as usize * units;
    let mut i = CUBE_POS_X as usize * units + UNIT_POS as usize;
    let mut acc = 0.0f32;
    while i < len as usize {
        let x = f32::cast_from(g[i]);
        acc += x * x;
        i += stride;
    }
    let total = cube_sum(acc, &mut scratch, units);
    if UNIT_POS == 0 {
        part[offset as usize + CUBE_POS_X as usize] = total;
    }
}

/// `coef[0] = min(1, max_norm / (√Σ part + tiny))`. One cube.
#[cube(launch_unchecked)]
fn clip_coef_kernel(
    part: &Array<f32>,
    coef: &mut Array<f32>,
    parts: u32,
    max_norm: f32,
    tiny: f32,
    #[comptime] units: usize,
) {
    let mut scratch = SharedMemory::<f32>::new(units);
    let mut i = UNIT_POS as usize;
    let mut acc = 0.0f32;
    while i < parts as usize {
        acc += part[i];
        i += units;
    }
    let total = cube_sum(acc, &mut scratch, units);
    if UNIT_POS == 0 {
        let c = max_norm / (f32::sqrt(total) + tiny);
        coef[0] = select(c < 1.0f32, c, 1.0f32);
    }
}

/// The step, one unit per element.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float>(
    param: &mut Array<F>,
    grad: &Array<F>,
    m: &mut Array<F>,
    v: &mut Array<F>,
    param_src: &Array<F>,
    m_src: &Array<F>,
    v_src: &Array<F>,
    coef: &Array<f32>,
    len: u32,
    s: Scalars,
    #[comptime] l: AdamWLayout,
    #[define(F)] _dtype: StorageType,
) {
    let i = linear_unit();
    if i < len as usize {
        let mut g = f32::cast_from(grad[i]);
        if comptime!(l.clip == ClipKind::Value) {
            let c = s.clip_value;
            // Comparisons, not min/max: a NaN gradient stays NaN, as under Burn's masks.
            if g > c {
                g = c;
            } else if g < -c {
                g = -c;
            }
        }
        if comptime!(l.clip == ClipKind::Norm) {
            g *= coef[0];
        }
        let mut mv = s.factor_1 * g;
        let mut vv = s.factor_2 * g * g;
        if comptime!(l.has_state) {
            let (m_old, v_old) = if comptime!(l.into[1]) {
                (m_src[i], v_src[i])
            } else {
                (m[i], v[i])
            };
            mv += s.beta_1 * f32::cast_from(m_old);
            vv += s.beta_2 * f32::cast_from(v_old);
        }
        m[i] = F::cast_from(mv);
        v[i] = F::cast_from(vv);
        // From the moments in f32, not as stored: a half-precision `v` underflows to zero
        // for gradients below about 1e-3 (f16), which would turn `δ` into `m / ε`.
        let delta = (mv / s.bias_1) / (f32::sqrt(vv / s.bias_2) + s.epsilon);
        let p = if comptime!(l.into[0]) {
            f32::cast_from(param_src[i])
        } else {
            f32::cast_from(param[i])
        };
        let mut kept = p * s.keep;
        if comptime!(l.cautious) {
            let differ = (p >= 0.0f32) != (mv >= 0.0f32);
            kept = select(differ, p, p - p * s.decay);
        }
        param[i] = F::cast_from(kept - s.lr * delta);
    }
}

/// The update kernel's scalars.
#[derive(CubeLaunch, CubeType)]
pub struct Scalars {
    lr: f32,
    beta_1: f32,
    beta_2: f32,
    /// `1 − β₁`, `1 − β₂`.
    factor_1: f32,
    factor_2: f32,
    /// `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    bias_1: f32,
    bias_2: f32,
    epsilon: f32,
    /// `λ = lr · weight_decay` and `1 − λ`.
    decay: f32,
    keep: f32,
    /// Clipping by value's threshold.
    clip_value: f32,
}

/// The scalars as Burn computes them: its corrections in `f32` powers, its decay factor in
/// `f64`.
fn scalars<R: Runtime>(s: &AdamWStep) -> ScalarsLaunch<R> {
    let t = s.time.min(i32::MAX as usize) as i32;
    let decay = s.lr * s.weight_decay as f64;
    let clip_value = match s.clip {
        Some(GradClip::Value(c)) => c,
        _ => 0.0,
    };
    ScalarsLaunch::new(
        s.lr as f32,
        s.beta_1,
        s.beta_2,
        1.0 - s.beta_1,
        1.0 - s.beta_2,
        1.0 - s.beta_1.powi(t),
        1.0 - s.beta_2.powi(t),
        s.epsilon,
        decay as f32,
        (1.0 - decay) as f32,
        clip_value,
    )
}

/// One AdamW step from `grad`: the parameter, `m` and `v` (each `len` elements of the problem's
/// dtype) are updated in place or written to fresh buffers ([`Slot`]); on the first step
/// (`has_state` false) the moments' sources are not read. Every buffer written must be distinct
/// from every other buffer of the call, and `m` and `v` are both in place or both not.
pub fn adamw_step<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AdamWProblem,
    s: &AdamWStep,
    grad: &Handle,
    slots: [Slot<'_>; 3],
) -> Result<(), KernelError> {
    launch(client, p, s, grad, slots, None)
}

/// [`adamw_step`] with the gradient multiplied by `scale[0]` (one `f32`) instead of clipped by
/// the step's own options, which must ask for none: clipping by the global norm of all of a
/// model's gradients, whose coefficient a device reduction over every gradient computed before
/// the first parameter's step (PyTorch's `clip_grad_norm_`, as FLA's training clips). Read on
/// the device, so the step needs no read-back.
pub fn adamw_step_scaled<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AdamWProblem,
    s: &AdamWStep,
    grad: &Handle,
    slots: [Slot<'_>; 3],
    scale: &Handle,
) -> Result<(), KernelError> {
    if s.clip.is_some() {
        return Err(KernelError::InvalidProblem(
            "a scaled AdamW step clips by its scale alone: the step's own clipping must be none"
                .into(),
        ));
    }
    fits("scale", scale, 1, 4)?;
    launch(client, p, s, grad, slots, Some(scale))
}

/// Cubes of one gradient's sum of squares.
fn sum_parts(len: usize) -> usize {
    len.div_ceil(SUM_UNITS).min(MAX_PARTS)
}

/// The coefficient of clipping by the global norm, on the device, for [`adamw_step_scaled`]:
/// `min(1, max_norm / (‖g‖ + 1e-6))` with `‖g‖` the L2 norm of all the gradients `grads`
/// (`(buffer, entries)`, each in `dtype`) together, as PyTorch's `clip_grad_norm_` computes it.
/// One sum-of-squares kernel per gradient, each writing its cubes' partial sums into one
/// buffer, then one cube totals them: a launch per gradient and one more, where a norm per
/// gradient tensor took two each. Returns a buffer of one `f32`.
pub fn global_clip_coefficient<R: Runtime>(
    client: &ComputeClient<R>,
    grads: &[(&Handle, usize)],
    dtype: FloatDType,
    max_norm: f32,
) -> Result<Handle, KernelError> {
    if grads.is_empty() {
        return Err(KernelError::InvalidProblem(
            "no gradients for the global norm (zero-length list)".into(),
        ));
    }
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(KernelError::InvalidProblem(format!(
            "gradient clipping needs a positive finite threshold, got {max_norm}"
        )));
    }
    dtype.check_supported(client)?;
    for &(h, len) in grads {
        if len == 0 {
            return Err(KernelError::InvalidProblem(
                "a zero-length gradient in the global norm".into(),
            ));
        }
        if len > MAX_ADAMW_LEN {
            return Err(KernelError::DeviceLimit(format!(
                "{len} entries in one gradient, more than the global norm's {MAX_ADAMW_LEN}"
            )));
        }
        fits("grad", h, len, dtype.size())?;
    }
    let total: usize = grads.iter().map(|&(_, len)| sum_parts(len)).sum();
    if total > u32::MAX as usize {
        return Err(KernelError::DeviceLimit(format!(
            "{total} partial sums in the global norm, past 32-bit indices"
        )));
    }
    let part = client.empty(total * 4);
    let coef = client.empty(4);
    let mut offset = 0;
    for &(h, len) in grads {
        square_sums(client, (h, len), dtype, (&part, total), offset);
        offset += sum_parts(len);
    }
    coefficient(client, (&part, total), &coef, max_norm, GLOBAL_NORM_EPS);
    Ok(coef)
}

/// Writes the partial sums of `g²` of gradient `grad` (`len` entries) into `part[offset ..
/// offset + sum_parts(len)]` (a buffer of `total`).
fn square_sums<R: Runtime>(
    client: &ComputeClient<R>,
    (grad, len): (&Handle, usize),
    dtype: FloatDType,
    (part, total): (&Handle, usize),
    offset: usize,
) {
    // Every access is guarded by the kernel's own bounds.
    unsafe {
        square_sum_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(sum_parts(len) as u32, 1, 1),
            CubeDim::new_1d(SUM_UNITS as u32),
            array(grad, len),
            array(part, total),
            offset as u32,
            len as u32,
            SUM_UNITS,
            dtype.storage(),
        );
    }
}

/// `coef[0] = min(1, max_norm / (√Σ part + tiny))` over the `total` partial sums.
fn coefficient<R: Runtime>(
    client: &ComputeClient<R>,
    (part, total): (&Handle, usize),
    coef: &Handle,
    max_norm: f32,
    tiny: f32,
) {
    // Every access is guarded by the kernel's own bounds.
    unsafe {
        clip_coef_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(SUM_UNITS as u32),
            array(part, total),
            array(coef, 1),
            total as u32,
            max_norm,
            tiny,
            SUM_UNITS,
        );
    }
}

/// What PyTorch's `clip_grad_norm_` adds to the global norm before dividing by it.
pub const GLOBAL_NORM_EPS: f32 = 1e-6;

fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AdamWProblem,
    s: &AdamWStep,
    grad: &Handle,
    [param, m, v]: [Slot<'_>; 3],
    scale: Option<&Handle>,
) -> Result<(), KernelError> {
    p.validate()?;
    s.validate(p.has_state)?;
    p.dtype.check_supported(client)?;
    fits("grad", grad, p.len, p.dtype.size())?;
    for (name, slot) in [("param", param), ("m", m), ("v", v)] {
        fits(name, slot.source(), p.len, p.dtype.size())?;
        fits(name, slot.target(), p.len, p.dtype.size())?;
    }
    if m.fresh() != v.fresh() {
        return Err(KernelError::InvalidProblem(
            "AdamW's moments must both be updated in place or both into fresh buffers".into(),
        ));
    }
    let clip = match s.clip {
        // The kernel's clipping by norm multiplies by `coef[0]`: here the caller's scale.
        None if scale.is_some() => ClipKind::Norm,
        None => ClipKind::None,
        Some(GradClip::Value(_)) => ClipKind::Value,
        Some(GradClip::Norm(_)) => ClipKind::Norm,
    };
    let coef = scale.cloned().unwrap_or_else(|| client.empty(4));
    if let Some(GradClip::Norm(max_norm)) = s.clip {
        let parts = sum_parts(p.len);
        let part = client.empty(parts * 4);
        square_sums(client, (grad, p.len), p.dtype, (&part, parts), 0);
        coefficient(
            client,
            (&part, parts),
            &coef,
            max_norm,
            min_positive(p.dtype),
        );
    }
    let l = AdamWLayout {
        has_state: p.has_state,
        clip,
        cautious: s.cautious_weight_decay,
        into: [param.fresh(), m.fresh(), v.fresh()],
    };
    // A source read in place is bound once, as the buffer written: a one-entry placeholder
    // stands in for it (wgpu refuses a buffer bound twice with one binding writable).
    let dummy = client.empty(p.dtype.size());
    let src = |slot: Slot<'_>| {
        if slot.fresh() {
            array(slot.source(), p.len)
        } else {
            array(&dummy, 1)
        }
    };
    unsafe {
        adamw_kernel::launch_unchecked::<R>(
            client,
            elementwise_grid(p.len),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(param.target(), p.len),
            array(grad, p.len),
            array(m.target(), p.len),
            array(v.target(), p.len),
            src(param),
            src(m),
            src(v),
            array(&coef, 1),
            p.len as u32,
            scalars::<R>(s),
            l,
            p.dtype.storage(),
        )
    };
    Ok(())
}
