//! Kernel-level tests of SwiGLU's fused activation against the f64 reference: `y`, `dg`, `du`
//! for a random `dy`, odd lengths, saturated gates, half precision, refused input.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::swiglu::{naive, swiglu_backward, swiglu_forward, SwigluProblem};
use fla_cubecl_kernels::testing::{decode, encode, round_to, Rng};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{
    assert_dtype_refused, assert_refused, base_dtype, check, computes, runtime_name, tolerance,
    Refusal,
};

type Run = [Vec<f64>; 3];

fn run_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    p: &SwigluProblem,
    [g, u, dy]: [&[f64]; 3],
) -> Result<Run, KernelError> {
    let dt = p.dtype;
    let up = |xs: &[f64]| client.create_from_slice(&encode(dt, xs));
    // Outputs start as NaN, so an element the kernels never write fails the comparison.
    let poison = || client.create_from_slice(&encode(dt, &vec![f64::NAN; p.len]));
    let down = |h: &Handle| decode(dt, &client.read_one_unchecked(h.clone()));
    let (g, u, dy) = (up(g), up(u), up(dy));
    let (y, dg, du) = (poison(), poison(), poison());
    swiglu_forward(client, p, &g, &u, &y)?;
    swiglu_backward(client, p, [&g, &u, &dy], [&dg, &du])?;
    Ok([down(&y), down(&dg), down(&du)])
}

/// `g` scaled by `spread`, `u` and `dy` standard normal, all rounded to the dtype.
fn inputs(p: &SwigluProblem, spread: f64, seed: u64) -> [Vec<f64>; 3] {
    let mut rng = Rng::new(seed);
    let g = (0..p.len)
        .map(|_| round_to(p.dtype, spread * rng.normal()))
        .collect();
    [g, rng.normals(p.len, p.dtype), rng.normals(p.len, p.dtype)]
}

fn compare(p: &SwigluProblem, spread: f64, seed: u64) {
    let [g, u, dy] = inputs(p, spread, seed);
    let [y, dg, du] = on_runtime!(run_kernels(p, [&g, &u, &dy])).expect("valid problem");
    let (want_dg, want_du) = naive::backward(&g, &u, &dy);
    let tol = tolerance(p.dtype);
    check("y", &y, &naive::forward(&g, &u), tol);
    check("dg", &dg, &want_dg, tol);
    check("du", &du, &want_du, tol);
}

#[rstest]
#[case::one(1)]
#[case::odd(1001)]
#[case::whole_vectors(8 * 1001)]
#[case::half_vectors(2 * 1001)]
#[case::past_one_grid_row(256 * 65535 + 3)]
fn matches_reference(#[case] len: usize) {
    let p = SwigluProblem {
        len,
        dtype: base_dtype(),
    };
    compare(&p, 2.0, len as u64);
}

/// Gates far in both tails: swish's saturated ends stay finite and exact.
#[test]
fn saturated_gates() {
    let p = SwigluProblem {
        len: 4096,
        dtype: base_dtype(),
    };
    compare(&p, 40.0, 3);
}

/// Gates far below zero (−10² .. −10³⁶, f32): swish, `du` and `dg` are 0, as in the reference,
/// not a tiny `σ` scaled back up by the gate (a sigmoid clamped to stay finite would give −18 at
/// `g = −1e36`).
#[test]
fn very_negative_gates_give_zero() {
    let p = SwigluProblem {
        len: 35 * 8,
        dtype: FloatDType::F32,
    };
    let g: Vec<f64> = (0..p.len)
        .map(|i| round_to(p.dtype, -(10f64.powi(2 + (i % 35) as i32))))
        .collect();
    let mut rng = Rng::new(5);
    let (u, dy) = (rng.normals(p.len, p.dtype), rng.normals(p.len, p.dtype));
    let [y, dg, du] = on_runtime!(run_kernels(&p, [&g, &u, &dy])).expect("valid problem");
    let (want_dg, want_du) = naive::backward(&g, &u, &dy);
    // The reference values are 0 or below f32's range (σ(−100) ≈ 4e-44): an absolute check.
    for (name, out, want) in [
        ("y", &y, &naive::forward(&g, &u)),
        ("dg", &dg, &want_dg),
        ("du", &du, &want_du),
    ] {
        for (i, (o, w)) in out.iter().zip(want).enumerate() {
            assert!(
                (o - w).abs() <= 1e-30,
                "{name}[{i}] = {o:e} at g = {:e}, reference {w:e}",
                g[i]
            );
        }
    }
}

/// f16 and bf16 where the device computes them; elsewhere the call is refused with the dtype's
/// name.
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    let p = SwigluProblem { len: 3000, dtype };
    if on_runtime!(computes(dtype)) {
        compare(&p, 2.0, 5);
    } else {
        let [g, u, dy] = inputs(&p, 1.0, 5);
        assert_dtype_refused(on_runtime!(run_kernels(&p, [&g, &u, &dy])), dtype);
    }
}

#[test]
fn empty_input_is_refused() {
    let p = SwigluProblem {
        len: 0,
        dtype: FloatDType::F32,
    };
    assert_refused(
        on_runtime!(run_kernels(&p, [&[], &[], &[]])),
        Refusal::InvalidProblem,
        "zero-length",
    );
}
