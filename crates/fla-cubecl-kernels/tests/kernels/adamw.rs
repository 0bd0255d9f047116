//! Kernel-level tests of the fused AdamW step against the f64 reference: the parameter, its
//! update and both moments, on the first step and later ones, with each kind of clipping and
//! weight decay, odd lengths, half precision, refused input.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::adamw::{
    adamw_step, adamw_step_scaled, global_clip_coefficient, min_positive, naive, AdamWProblem,
    AdamWStep, GradClip, Slot,
};
use fla_cubecl_kernels::testing::{adamw_step as hyper, decode, encode, round_to, Rng};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{
    assert_dtype_refused, assert_refused, base_dtype, check, computes, runtime_name, tolerance,
    Refusal,
};

/// A parameter, its gradient and the previous moments, rounded to the dtype.
struct Inputs {
    param: Vec<f64>,
    grad: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Inputs {
    fn new(p: &AdamWProblem, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let dt = p.dtype;
        let param = rng.normals(p.len, dt);
        let grad = rng.normals(p.len, dt);
        let m = (0..p.len)
            .map(|_| round_to(dt, 0.1 * rng.normal()))
            .collect();
        // Second moments are non-negative.
        let v = (0..p.len)
            .map(|_| round_to(dt, 0.01 * rng.normal().powi(2)))
            .collect();
        Self { param, grad, m, v }
    }

    fn reference(&self, p: &AdamWProblem, s: &AdamWStep) -> [Vec<f64>; 3] {
        let state = p.has_state.then_some((&self.m[..], &self.v[..]));
        naive::step(
            &self.param,
            &self.grad,
            state,
            s,
            min_positive(p.dtype) as f64,
        )
    }
}

/// Where the step writes: over its inputs, or into fresh buffers (the parameter alone, or the
/// parameter and both moments).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    InPlace,
    FreshParam,
    FreshAll,
}

fn run_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AdamWProblem,
    s: &AdamWStep,
    x: &Inputs,
) -> Result<[Vec<f64>; 3], KernelError> {
    run_into(client, p, s, x, Target::InPlace)
}

/// The step with its results written as `target` says; with fresh buffers (which start as NaN,
/// so an entry left unwritten shows) the inputs must come back unchanged.
fn run_into<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AdamWProblem,
    s: &AdamWStep,
    x: &Inputs,
    target: Target,
) -> Result<[Vec<f64>; 3], KernelError> {
    let dt = p.dtype;
    let up = |xs: &[f64]| client.create_from_slice(&encode(dt, xs));
    let down = |h: &Handle| decode(dt, &client.read_one_unchecked(h.clone()));
    let nan = vec![f64::NAN; p.len];
    let (param, grad) = (up(&x.param), up(&x.grad));
    // Without state the moments start as NaN: the first step must write them without reading.
    let (m, v) = if p.has_state {
        (up(&x.m), up(&x.v))
    } else {
        (up(&nan), up(&nan))
    };
    let fresh = [up(&nan), up(&nan), up(&nan)];
    fn slot<'a>(h: &'a Handle, into: bool, fresh: &'a Handle) -> Slot<'a> {
        if into {
            Slot::Into { from: h, to: fresh }
        } else {
            Slot::InPlace(h)
        }
    }
    let (p_into, m_into) = match target {
        Target::InPlace => (false, false),
        Target::FreshParam => (true, false),
        Target::FreshAll => (true, true),
    };
    adamw_step(
        client,
        p,
        s,
        &grad,
        [
            slot(&param, p_into, &fresh[0]),
            slot(&m, m_into, &fresh[1]),
            slot(&v, m_into, &fresh[2]),
        ],
    )?;
    let same = |name: &str, got: Vec<f64>, want: &[f64]| {
        let kept = got
            .iter()
            .zip(want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(kept, "{name}: the step wrote over an input it was to leave");
    };
    if p_into {
        same("param", down(&param), &x.param);
    }
    if m_into && p.has_state {
        same("m", down(&m), &x.m);
        same("v", down(&v), &x.v);
    }
    let out = |h: &Handle, into: bool, f: &Handle| down(if into { f } else { h });
    Ok([
        out(&param, p_into, &fresh[0]),
        out(&m, m_into, &fresh[1]),
        out(&v, m_into, &fresh[2]),
    ])
}

/// Runs the step and compares the parameter, the moments and, in `f32`, the update
/// `p_new − p` on its own (the parameter's own size hides errors in it).
fn compare(p: &AdamWProblem, s: &AdamWStep, seed: u64) {
    compare_into(p, s, seed, Target::InPlace)
}

fn compare_into(p: &AdamWProblem, s: &AdamWStep, seed: u64, target: Target) {
    let x = Inputs::new(p, seed);
    let [param, m, v] = on_runtime!(run_into(p, s, &x, target)).expect("valid problem");
    let [want_p, want_m, want_v] = x.reference(p, s);
    let tol = tolerance(p.dtype);
    check("m", &m, &want_m, tol);
    check("v", &v, &want_v, tol);
    check("param", &param, &want_p, tol);
    if p.dtype == FloatDType::F32 {
        let step =
            |out: &[f64]| -> Vec<f64> { out.iter().zip(&x.param).map(|(a, b)| a - b).collect() };
        // The update is a difference of two parameters each rounded to f32: about 1e-7 of the
        // parameter against a 5e-2 step.
        check("update", &step(&param), &step(&want_p), 10.0 * tol);
    } else {
        // In half precision the parameter's rounding (2^-8 of it in bf16) is as large as a
        // wrong update could be, so a relative check cannot see the update. The kernel computes
        // in f32 and rounds once: each new parameter is the reference's within one unit in the
        // last place of the dtype (the f32 value may fall on the other side of a rounding
        // midpoint than the exact one), which an update wrong by a few percent is not.
        within_one_ulp("param", &param, &want_p, p.dtype);
    }
}

/// One unit in the last place of `x` in a half-precision dtype (10 or 7 stored mantissa bits;
/// subnormals share the smallest normal's unit).
fn ulp(dtype: FloatDType, x: f64) -> f64 {
    let (mantissa, min_exp) = match dtype {
        FloatDType::F16 => (10, -14),
        FloatDType::BF16 => (7, -126),
        FloatDType::F32 => (23, -126),
    };
    let e = (x.abs().log2().floor() as i32).max(min_exp);
    2f64.powi(e - mantissa)
}

fn within_one_ulp(name: &str, got: &[f64], want: &[f64], dtype: FloatDType) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad = got
        .iter()
        .zip(want)
        .enumerate()
        // NaN fails too: its difference is not within any bound.
        .filter(|(_, (g, w))| {
            let within = (*g - *w).abs() <= ulp(dtype, g.abs().max(w.abs()));
            !within
        })
        .take(3)
        .collect::<Vec<_>>();
    assert!(
        bad.is_empty(),
        "{name}: more than one unit in the last place of {dtype:?} from the reference at (index, (got, want)) {bad:?}"
    );
}

fn problem(len: usize, has_state: bool) -> AdamWProblem {
    AdamWProblem {
        len,
        dtype: base_dtype(),
        has_state,
    }
}

#[rstest]
#[case::one(1)]
#[case::t63(63)]
#[case::t65(65)]
#[case::t1500(1500)]
// Past one grid row of update cubes (the norm's 1024 strided partial sums: `clipping`).
#[case::past_one_grid_row(256 * 65535 + 3)]
fn matches_reference(#[case] len: usize, #[values(false, true)] has_state: bool) {
    let time = if has_state { 7 } else { 1 };
    compare(&problem(len, has_state), &hyper(time, None), len as u64);
}

/// Results written into fresh buffers (the parameter of a model another tensor still holds, or
/// moments too), the inputs left unchanged, with and without clipping and state.
#[rstest]
fn into_fresh_buffers(
    #[values(Target::FreshParam, Target::FreshAll)] target: Target,
    #[values(false, true)] has_state: bool,
    #[values(None, Some(GradClip::Norm(1.0)))] clip: Option<GradClip>,
    #[values(1, 1500)] len: usize,
) {
    let time = if has_state { 6 } else { 1 };
    compare_into(&problem(len, has_state), &hyper(time, clip), 19, target);
}

/// The step with its gradient scaled by a coefficient read on the device (clipping by the
/// global norm), updating in place.
fn run_scaled<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AdamWProblem,
    s: &AdamWStep,
    x: &Inputs,
    scale: f32,
) -> Result<[Vec<f64>; 3], KernelError> {
    let dt = p.dtype;
    let up = |xs: &[f64]| client.create_from_slice(&encode(dt, xs));
    let down = |h: &Handle| decode(dt, &client.read_one_unchecked(h.clone()));
    let (param, grad, m, v) = (up(&x.param), up(&x.grad), up(&x.m), up(&x.v));
    let coef = client.create_from_slice(f32::as_bytes(&[scale]));
    let slots = [&param, &m, &v].map(Slot::InPlace);
    adamw_step_scaled(client, p, s, &grad, slots, &coef)?;
    Ok([down(&param), down(&m), down(&v)])
}

/// A scaled step against the reference's step on the gradient times the scale.
#[rstest]
fn scaled_gradient(#[values(0.03, 1.0)] scale: f32, #[values(1, 1500)] len: usize) {
    let p = problem(len, true);
    let s = hyper(4, None);
    let x = Inputs::new(&p, 23);
    let [param, m, v] = on_runtime!(run_scaled(&p, &s, &x, scale)).expect("valid problem");
    let scaled = Inputs {
        grad: x.grad.iter().map(|g| g * scale as f64).collect(),
        param: x.param.clone(),
        m: x.m.clone(),
        v: x.v.clone(),
    };
    let [want_p, want_m, want_v] = scaled.reference(&p, &s);
    let tol = tolerance(p.dtype);
    check("m", &m, &want_m, tol);
    check("v", &v, &want_v, tol);
    check("param", &param, &want_p, tol);
}

/// A scale beside the step's own clipping, and a scale buffer too short for one f32, are refused.
#[rstest]
#[case::with_clipping(Some(GradClip::Norm(1.0)), 4, "its scale alone")]
#[case::short_scale(None, 2, "scale holds")]
fn bad_scale_is_refused(#[case] clip: Option<GradClip>, #[case] bytes: usize, #[case] what: &str) {
    fn go<R: Runtime>(
        client: &ComputeClient<R>,
        clip: Option<GradClip>,
        bytes: usize,
    ) -> Result<(), KernelError> {
        let p = AdamWProblem {
            len: 8,
            dtype: FloatDType::F32,
            has_state: true,
        };
        let h: Vec<Handle> = (0..4).map(|_| client.empty(8 * 4)).collect();
        let coef = client.empty(bytes);
        let slots = [&h[1], &h[2], &h[3]].map(Slot::InPlace);
        adamw_step_scaled(client, &p, &hyper(2, clip), &h[0], slots, &coef)
    }
    let got = on_runtime!(go(clip, bytes));
    let msg = format!("{got:?}");
    assert!(got.is_err() && msg.contains(what), "{msg}");
}

/// The global norm's coefficient over several gradients of odd lengths (past one cube's and
/// one grid's worth of partial sums) against f64: `min(1, max / (‖g‖ + 1e-6))`.
fn run_global<R: Runtime>(
    client: &ComputeClient<R>,
    grads: &[Vec<f64>],
    dtype: FloatDType,
    max: f32,
) -> Result<f64, KernelError> {
    let handles: Vec<Handle> = grads
        .iter()
        // An empty gradient still gets a buffer (of one entry): the call must refuse its length.
        .map(|g| client.create_from_slice(&encode(dtype, if g.is_empty() { &[0.0] } else { g })))
        .collect();
    let bufs: Vec<(&Handle, usize)> = handles
        .iter()
        .zip(grads)
        .map(|(h, g)| (h, g.len()))
        .collect();
    let coef = global_clip_coefficient(client, &bufs, dtype, max)?;
    Ok(decode(FloatDType::F32, &client.read_one_unchecked(coef))[0])
}

#[rstest]
fn global_coefficient(#[values(0.5, 1e6)] max: f32) {
    let dtype = base_dtype();
    let mut rng = Rng::new(29);
    let grads: Vec<Vec<f64>> = [1, 63, 1500, 300_007]
        .into_iter()
        .map(|n| rng.normals(n, dtype))
        .collect();
    let got = on_runtime!(run_global(&grads, dtype, max)).expect("valid gradients");
    let norm = grads.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
    let want = (max as f64 / (norm + 1e-6)).min(1.0);
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "coefficient {got}, want {want} (norm {norm})"
    );
}

#[rstest]
#[case::no_gradients(vec![], 1.0, "no gradients")]
#[case::empty_gradient(vec![vec![1.0], vec![]], 1.0, "zero-length")]
#[case::zero_threshold(vec![vec![1.0]], 0.0, "threshold")]
#[case::nan_threshold(vec![vec![1.0]], f32::NAN, "threshold")]
fn bad_global_input_is_refused(#[case] grads: Vec<Vec<f64>>, #[case] max: f32, #[case] what: &str) {
    assert_refused(
        on_runtime!(run_global(&grads, FloatDType::F32, max)),
        Refusal::InvalidProblem,
        what,
    );
}

/// Clipping by norm when it binds (a norm of about √len against 1) and when it does not, and by
/// value.
#[rstest]
fn clipping(
    #[values(GradClip::Norm(1.0), GradClip::Norm(1e6), GradClip::Value(0.5))] clip: GradClip,
    #[values(1, 1500, 300_007)] len: usize,
) {
    compare(&problem(len, true), &hyper(3, Some(clip)), 11);
}

/// Cautious weight decay (decay only where the parameter and the new moment agree in sign) and
/// no decay at all.
#[rstest]
#[case::cautious(true, 0.1)]
#[case::no_decay(false, 0.0)]
fn decoupled_decay(#[case] cautious: bool, #[case] weight_decay: f32) {
    let s = AdamWStep {
        cautious_weight_decay: cautious,
        weight_decay,
        ..hyper(4, Some(GradClip::Norm(2.0)))
    };
    compare(&problem(1500, true), &s, 13);
}

/// f16 and bf16 where the device computes them; elsewhere the call is refused with the dtype's
/// name.
#[rstest]
fn half_precision(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(false, true)] has_state: bool,
) {
    let p = AdamWProblem {
        len: 3000,
        dtype,
        has_state,
    };
    let s = hyper(if has_state { 5 } else { 1 }, Some(GradClip::Norm(4.0)));
    if on_runtime!(computes(dtype)) {
        compare(&p, &s, 17);
    } else {
        let x = Inputs::new(&p, 17);
        assert_dtype_refused(on_runtime!(run_kernels(&p, &s, &x)), dtype);
    }
}

#[rstest]
#[case::empty(0, true, hyper(2, None), "zero-length")]
#[case::step_zero(8, true, hyper(0, None), "starts at 1")]
#[case::later_step_without_moments(8, false, hyper(3, None), "without moments")]
#[case::beta_one(8, true, AdamWStep { beta_2: 1.0, ..hyper(2, None) }, "beta_2")]
#[case::nan_lr(8, true, AdamWStep { lr: f64::NAN, ..hyper(2, None) }, "finite")]
#[case::zero_clip(8, true, hyper(2, Some(GradClip::Norm(0.0))), "threshold")]
#[case::negative_clip(8, true, hyper(2, Some(GradClip::Value(-1.0))), "threshold")]
fn bad_input_is_refused(
    #[case] len: usize,
    #[case] has_state: bool,
    #[case] s: AdamWStep,
    #[case] what: &str,
) {
    let p = AdamWProblem {
        len,
        dtype: FloatDType::F32,
        has_state,
    };
    let x = Inputs::new(&p, 1);
    assert_refused(
        on_runtime!(run_kernels(&p, &s, &x)),
        Refusal::InvalidProblem,
        what,
    );
}
